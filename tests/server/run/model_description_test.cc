#include "server/run/model_description.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "jobs/build_store.h"
#include "common/sha256.h"

namespace retrace::run {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string FreshDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  fs::path dir = fs::path(tmp != nullptr ? tmp : fs::temp_directory_path()) /
                 absl::StrCat("model-description-", name, "-", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A valid TorchScript-kind description of two checkpoints; CKPT0/CKPT1 and
// the other upper-case words are replaced by the tests.
constexpr char kValid[] = R"(format = "retrace-model"
version = 1

[model]
kind = "torchscript"

[image]
channels = 3
height = 32
width = 16
pixel_range = [0.0, 1.0]

[schedule]
type = "linear"
timesteps = 1000
beta_start = 0.0001
beta_end = 0.02

[loss]
type = "l1"
prediction = "epsilon"

[[checkpoints]]
file = "a.pt"
weight = 0.1

[[checkpoints]]
file = "sub/b.pt"
weight = 0.30000000000000004
step = 7

[data]
source = "folder"
path = "images"
)";

TEST(ModelDescriptionTest, ParsesEveryField) {
  absl::StatusOr<ModelDescription> d =
      ParseModelDescription(kValid, "dir/model.toml");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->kind, ModelKind::kTorchScript);
  EXPECT_EQ(d->image.channels, 3);
  EXPECT_EQ(d->image.height, 32);
  EXPECT_EQ(d->image.width, 16);
  EXPECT_EQ(d->image.pixel_min, 0.0);
  EXPECT_EQ(d->image.pixel_max, 1.0);
  EXPECT_EQ(d->schedule.type, "linear");
  EXPECT_EQ(d->loss, "l1");
  ASSERT_EQ(d->checkpoints.size(), 2u);
  EXPECT_EQ(d->checkpoints[0].step, 0);  // defaults to the index
  EXPECT_EQ(d->checkpoints[1].step, 7);
  EXPECT_EQ(d->checkpoints[1].weight, 0.30000000000000004);
  EXPECT_EQ(d->Resolve(d->checkpoints[1].file), "dir/sub/b.pt");
  EXPECT_EQ(d->data.path, "images");
  EXPECT_TRUE(d->training_run.empty());
}

TEST(ModelDescriptionTest, FormatReadsBackExactly) {
  ModelDescription d;
  d.kind = ModelKind::kBuiltinUNet;
  d.unet.base_channels = 8;
  d.unet.channel_mults = {1, 2};
  d.unet.attention = false;
  d.unet.norm_groups = 4;
  d.image = {1, 28, 28, -1.0, 1.0};
  d.schedule.type = "alpha_bars";
  d.schedule.timesteps = 3;
  d.schedule.values = {0.9, 1.0 / 3.0, 0.1};
  d.checkpoints = {{"ckpt-000100.pt", 0.1 * 3, std::string(64, 'a'), 100}};
  d.data.source = "mixture";
  d.data.spec = "fashion-mnist:train:limit=10";
  d.data.seed = 42;
  d.data.sha256 = std::string(64, 'b');
  d.training_run = ".";
  const std::string text = FormatModelDescription(d);
  absl::StatusOr<ModelDescription> back =
      ParseModelDescription(text, "model.toml");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  EXPECT_EQ(back->kind, ModelKind::kBuiltinUNet);
  EXPECT_EQ(back->unet.base_channels, 8);
  EXPECT_EQ(back->unet.channel_mults, (std::vector<int64_t>{1, 2}));
  EXPECT_FALSE(back->unet.attention);
  EXPECT_EQ(back->schedule.values, d.schedule.values);  // bit-exact
  EXPECT_EQ(back->checkpoints[0].weight, d.checkpoints[0].weight);
  EXPECT_EQ(back->checkpoints[0].sha256, d.checkpoints[0].sha256);
  EXPECT_EQ(back->data.spec, d.data.spec);
  EXPECT_EQ(back->data.seed, 42u);
  EXPECT_EQ(back->training_run, ".");
  EXPECT_EQ(FormatModelDescription(*back), text);
}

// Found by model_description_fuzz: a file name holding a control character
// (here a form feed, a tab, a newline and DEL) was written raw into the TOML,
// which TOML does not allow, so the description did not read back.
TEST(ModelDescriptionTest, FormatEscapesControlCharactersInStrings) {
  ModelDescription d;
  d.kind = ModelKind::kTorchScript;
  d.image = {3, 8, 8, -1.0, 1.0};
  d.checkpoints = {{"a\fb\tc\nd\x7f\"e\\f.pt", 1.0, "", 0}};
  const std::string text = FormatModelDescription(d);
  EXPECT_NE(text.find("a\\u000cb\\u0009c\\u000ad\\u007f\\\"e\\\\f.pt"),
            std::string::npos)
      << text;
  absl::StatusOr<ModelDescription> back =
      ParseModelDescription(text, "model.toml");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  EXPECT_EQ(FormatModelDescription(*back), text);
}

struct BadCase {
  std::string from;  // replaced in kValid
  std::string to;
  std::string message;  // expected in the error
};

TEST(ModelDescriptionTest, ErrorsNameTheFileAndTheField) {
  const BadCase cases[] = {
      {"type = \"linear\"", "type = \"quadratic\"",
       "m.toml: field 'schedule.type' is \"quadratic\"; expected one of"},
      {"kind = \"torchscript\"", "kind = \"onnx\"",
       "field 'model.kind' is \"onnx\""},
      {"prediction = \"epsilon\"", "prediction = \"v\"",
       "field 'loss.prediction' is \"v\""},
      {"channels = 3", "channels = 2", "field 'image.channels' is 2"},
      {"height = 32", "height = 512", "field 'image.height' is 512"},
      {"pixel_range = [0.0, 1.0]", "pixel_range = [1.0, 0.0]",
       "field 'image.pixel_range'"},
      {"beta_end = 0.02", "beta_end = 0.02\nbeta_middle = 0.01",
       "field 'schedule.beta_middle' is not a known key"},
      {"beta_end = 0.02", "beta_end = 2.0", "field 'schedule'"},
      {"weight = 0.1", "weight = \"0.1\"",
       "field 'checkpoints[0].weight' must be a number"},
      {"file = \"a.pt\"\n", "file = \"a.pt\"\nsha256 = \"abc\"\n",
       "field 'checkpoints[0].sha256' must be 64 lowercase hex digits"},
      {"source = \"folder\"", "source = \"web\"", "field 'data.source'"},
      {"version = 1", "version = 2", "field 'version' is 2"},
      {"[image]", "[imag]", "field 'image' missing"},
      {"timesteps = 1000", "timesteps = [1000]",
       "field 'schedule.timesteps' must be an integer"},
      {"type = \"linear\"\ntimesteps = 1000",
       "type = \"betas\"\ntimesteps = 3\nvalues = [0.1, 0.2]",
       "field 'schedule.values' holds 2 values but timesteps is 3"},
      {"[schedule]", "[schedule", "m.toml:"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.to);
    const std::string text = absl::StrReplaceAll(kValid, {{c.from, c.to}});
    ASSERT_NE(text, kValid);
    absl::StatusOr<ModelDescription> d = ParseModelDescription(text, "m.toml");
    ASSERT_FALSE(d.ok());
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(d.status().message(), HasSubstr(c.message));
  }
}

TEST(ModelDescriptionTest, LoadChecksCheckpointFilesAndHashes) {
  const std::string dir = FreshDir("load");
  fs::create_directories(dir + "/sub");
  WriteText(dir + "/a.pt", "first");
  WriteText(dir + "/model.toml", kValid);
  // sub/b.pt is missing.
  absl::StatusOr<ModelDescription> d = LoadModelDescription(dir);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(d.status().message(),
              HasSubstr(dir + "/model.toml: field 'checkpoints[1].file'"));
  EXPECT_THAT(d.status().message(), HasSubstr(dir + "/sub/b.pt"));

  // Present: absent hashes are filled in.
  WriteText(dir + "/sub/b.pt", "second");
  d = LoadModelDescription(dir + "/model.toml");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->checkpoints[0].sha256, Sha256Hex("first"));
  EXPECT_EQ(d->checkpoints[1].sha256, Sha256Hex("second"));

  // A recorded hash that the file no longer has.
  const std::string pinned = absl::StrReplaceAll(
      kValid,
      {{"file = \"a.pt\"\n", absl::StrCat("file = \"a.pt\"\nsha256 = \"",
                                          Sha256Hex("other"), "\"\n")}});
  WriteText(dir + "/model.toml", pinned);
  d = LoadModelDescription(dir);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(d.status().message(), HasSubstr("field 'checkpoints[0].sha256'"));
  EXPECT_THAT(d.status().message(), HasSubstr(Sha256Hex("first")));
  EXPECT_THAT(d.status().message(), HasSubstr(Sha256Hex("other")));
  // Without verification the recorded hash is kept.
  EXPECT_TRUE(LoadModelDescription(dir, /*verify_checksums=*/false).ok());
}

TEST(ModelDescriptionTest, SchedulesMapOntoTheModelLibrary) {
  ScheduleDescription s;
  s.type = "alpha_bars";
  s.timesteps = 3;
  s.values = {0.9, 0.5, 0.25};
  absl::StatusOr<model::NoiseSchedule> schedule = CreateNoiseSchedule(s);
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  EXPECT_EQ(schedule->AlphaBar(1), 0.5);
  EXPECT_DOUBLE_EQ(schedule->Beta(1), 1.0 - 0.5 / 0.9);
  s.values = {0.9, 0.95, 0.25};  // not decreasing
  EXPECT_THAT(CreateNoiseSchedule(s).status().message(), HasSubstr("value 1"));
  s.type = "betas";
  s.values = {0.1, 0.2, 0.3};
  schedule = CreateNoiseSchedule(s);
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  EXPECT_DOUBLE_EQ(schedule->AlphaBar(2), 0.9 * 0.8 * 0.7);
}

TEST(ModelDescriptionTest, PixelRangeMapsFromMinusOneToOne) {
  ImageDescription image;
  image.pixel_min = 0.0;
  image.pixel_max = 1.0;
  float pixels[] = {-1.0f, 0.0f, 1.0f};
  ToModelRange(image, pixels, 3);
  EXPECT_FLOAT_EQ(pixels[0], 0.0f);
  EXPECT_FLOAT_EQ(pixels[1], 0.5f);
  EXPECT_FLOAT_EQ(pixels[2], 1.0f);
}

// The TorchScript files of tests/server/model/make_torchscript_fixture.py.
std::string FixtureDir() {
  const char* dir = std::getenv("RETRACE_TORCHSCRIPT_FIXTURE_DIR");
  if (dir == nullptr || !fs::exists(fs::path(dir) / "manifest.json")) return "";
  return dir;
}

// A description of one TorchScript checkpoint `file` taking 1×8×8 images.
std::string DescribeOne(const std::string& file) {
  return absl::StrReplaceAll(
      kValid, {{"channels = 3", "channels = 1"},
               {"height = 32", "height = 8"},
               {"width = 16", "width = 8"},
               {"file = \"a.pt\"", absl::StrCat("file = \"", file, "\"")},
               {"[[checkpoints]]\nfile = \"sub/b.pt\"\nweight = "
                "0.30000000000000004\nstep = 7\n",
                ""}});
}

TEST(ModelDescriptionTest, RefusesTorchScriptFilesAtLoadNamingTheField) {
  if (FixtureDir().empty()) {
    GTEST_SKIP()
        << "no TorchScript fixture (needs /usr/bin/python3 with torch)";
  }
  const std::string dir = FreshDir("torchscript");
  struct Case {
    std::string file;
    std::string message;
  };
  const Case cases[] = {
      {"one_input.pt", "forward"}, {"three_inputs.pt", "forward"},
      {"shrinks.pt", "shape"},     {"wants_rgb.pt", "shape"},
      {"version99.pt", "99"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.file);
    const std::string path = absl::StrCat(dir, "/", c.file, ".toml");
    WriteText(path, DescribeOne(FixtureDir() + "/" + c.file));
    absl::StatusOr<ModelDescription> d = LoadModelDescription(path);
    ASSERT_TRUE(d.ok()) << d.status();
    absl::StatusOr<std::unique_ptr<model::DiffusionModel>> net =
        LoadCheckpointModel(*d, 0);
    ASSERT_FALSE(net.ok());
    EXPECT_EQ(net.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(net.status().message(),
                HasSubstr(path + ": field 'checkpoints[0].file'"));
    EXPECT_THAT(net.status().message(), HasSubstr(c.file));
    EXPECT_THAT(net.status().message(), HasSubstr(c.message));

    // build-store refuses it before creating anything.
    jobs::StoreBuildConfig config;
    config.dim = 16;
    config.num_buckets = 2;
    data::ImageSet images;
    images.channels = 1;
    images.height = 8;
    images.width = 8;
    images.pixels.assign(2 * 64, 0.0f);
    images.labels = {0, 1};
    jobs::StoreBuildOptions options;
    options.model_path = path;
    options.out_dir = dir + "/store-" + c.file;
    absl::StatusOr<jobs::StoreBuildResult> built =
        jobs::BuildStore(config, images, {}, options);
    ASSERT_FALSE(built.ok());
    EXPECT_THAT(built.status().message(),
                HasSubstr("field 'checkpoints[0].file'"));
    EXPECT_FALSE(fs::exists(options.out_dir));
  }
  // The good model loads and takes the described shape.
  const std::string path = dir + "/good.toml";
  WriteText(path, DescribeOne(FixtureDir() + "/model.pt"));
  absl::StatusOr<ModelDescription> d = LoadModelDescription(path);
  ASSERT_TRUE(d.ok()) << d.status();
  absl::StatusOr<std::unique_ptr<model::DiffusionModel>> net =
      LoadCheckpointModel(*d, 0);
  ASSERT_TRUE(net.ok()) << net.status();
  EXPECT_EQ((*net)->InputShape().channels, 1);
  EXPECT_EQ((*net)->InputShape().height, 8);
}

}  // namespace
}  // namespace retrace::run

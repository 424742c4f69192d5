// TorchScript models against PyTorch: make_torchscript_fixture.py (run by CTest
// as a fixture) saves a scripted model together with x, ε, t, the eps it
// predicts, the per-example loss and the parameter gradients, all computed in
// Python. Here the C++ side recomputes them from the same inputs. The fixture
// also writes files that Create must refuse; their tests check the code and
// that the message names the file and what is wrong with it.
#include "server/model/torchscript_model.h"

#include <caffe2/serialize/versions.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/types.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/model/diffusion.h"

namespace retrace::model {
namespace {

// float32 forward/backward of the same graph in two runtimes: results agree to
// a few ulps; this leaves room for different summation orders.
constexpr double kAbsTol = 1e-5;
constexpr double kRelTol = 1e-4;

class TorchScriptModelTest : public testing::Test {
 protected:
  void SetUp() override {
    const char* dir = std::getenv("RETRACE_TORCHSCRIPT_FIXTURE_DIR");
    if (dir == nullptr || *dir == '\0') {
      GTEST_SKIP() << "RETRACE_TORCHSCRIPT_FIXTURE_DIR not set (CTest sets it "
                      "when a python3 with torch is available)";
    }
    dir_ = dir;
    std::ifstream in(dir_ + "/manifest.json");
    if (!in) GTEST_SKIP() << "no fixture in " << dir_;
    manifest_ = nlohmann::json::parse(in);
  }

  torch::Tensor Read(const nlohmann::json& entry,
                     torch::ScalarType dtype = torch::kFloat) {
    const std::string path = dir_ + "/" + entry["file"].get<std::string>();
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)),
                      std::istreambuf_iterator<char>());
    std::vector<int64_t> shape = entry["shape"].get<std::vector<int64_t>>();
    torch::Tensor out = torch::empty(shape, dtype);
    EXPECT_EQ(bytes.size(), out.numel() * out.element_size()) << path;
    std::memcpy(
        out.data_ptr(), bytes.data(),
        std::min<size_t>(bytes.size(), out.numel() * out.element_size()));
    return out;
  }

  std::string Refused(const std::string& key) const {
    return dir_ + "/" + manifest_["refused"][key].get<std::string>();
  }

  std::string dir_;
  nlohmann::json manifest_;
};

// Expects INVALID_ARGUMENT with a message containing every piece.
void ExpectRefused(const absl::Status& status,
                   const std::vector<std::string>& pieces) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  for (const std::string& piece : pieces) {
    EXPECT_NE(status.message().find(piece), std::string::npos)
        << "\"" << piece << "\" missing from: " << status.message();
  }
}

void ExpectClose(const torch::Tensor& actual, const torch::Tensor& expected,
                 const std::string& what) {
  ASSERT_EQ(actual.sizes().vec(), expected.sizes().vec()) << what;
  EXPECT_TRUE(torch::allclose(actual, expected, kRelTol, kAbsTol))
      << what << ": max abs difference "
      << (actual - expected).abs().max().item<double>();
}

TEST_F(TorchScriptModelTest, MatchesPyTorchForwardLossAndGradients) {
  auto model =
      TorchScriptModel::Create(dir_ + "/model.pt", ImageShape{1, 8, 8});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->Architecture(), "torchscript");
  torch::Tensor x = Read(manifest_["x"]);
  torch::Tensor eps = Read(manifest_["eps"]);
  torch::Tensor t = Read(manifest_["t"], torch::kLong);

  auto schedule = NoiseSchedule::Create(ScheduleType::kCosine).value();
  auto x_t = AddNoise(schedule, x, t, eps);
  ASSERT_TRUE(x_t.ok()) << x_t.status();
  ExpectClose(*x_t, Read(manifest_["x_t"]), "x_t");

  auto eps_hat = (*model)->Forward(*x_t, t);
  ASSERT_TRUE(eps_hat.ok()) << eps_hat.status();
  ExpectClose(*eps_hat, Read(manifest_["eps_hat"]), "eps_hat");

  auto loss = DiffusionLoss(**model, schedule, LossType::kMse, x, t, eps);
  ASSERT_TRUE(loss.ok()) << loss.status();
  ExpectClose(*loss, Read(manifest_["loss"]), "loss");

  std::vector<NamedParameter> params = (*model)->NamedParameters();
  const nlohmann::json& expected = manifest_["parameters"];
  ASSERT_EQ(params.size(), expected.size());
  std::vector<torch::Tensor> tensors;
  for (const NamedParameter& p : params) tensors.push_back(p.tensor);
  std::vector<torch::Tensor> grads =
      torch::autograd::grad({loss->sum()}, tensors);
  for (size_t i = 0; i < params.size(); ++i) {
    SCOPED_TRACE(params[i].name);
    EXPECT_EQ(params[i].name, expected[i]["name"].get<std::string>());
    ExpectClose(grads[i], Read(expected[i]), "gradient of " + params[i].name);
  }
}

TEST_F(TorchScriptModelTest, SaveAndLoadParameters) {
  auto model = TorchScriptModel::Create(dir_ + "/model.pt");
  ASSERT_TRUE(model.ok()) << model.status();
  const std::string copy = testing::TempDir() + "/torchscript_copy.pt";
  {
    torch::NoGradGuard no_grad;
    for (NamedParameter& p : (*model)->NamedParameters()) p.tensor.add_(1.0);
  }
  ASSERT_TRUE((*model)->Save(copy).ok());
  auto original = TorchScriptModel::Create(dir_ + "/model.pt");
  ASSERT_TRUE(original.ok());
  ASSERT_TRUE((*original)->Load(copy).ok());
  auto a = (*model)->NamedParameters(), b = (*original)->NamedParameters();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i].tensor, b[i].tensor)) << a[i].name;
  }
}

// A replica computes what the original computes, owns its parameters (plain
// leaves that require grad, so gradients can be taken on it), and the
// original's calls give the same bits before and after.
TEST_F(TorchScriptModelTest, CloneIsAnIndependentEqualReplica) {
  auto model =
      TorchScriptModel::Create(dir_ + "/model.pt", ImageShape{1, 8, 8});
  ASSERT_TRUE(model.ok()) << model.status();
  auto replica = (*model)->Clone();
  ASSERT_TRUE(replica.ok()) << replica.status();
  EXPECT_EQ((*replica)->Architecture(), "torchscript");
  torch::Tensor x = Read(manifest_["x"]);
  torch::Tensor t = Read(manifest_["t"], torch::kLong);
  auto a = (*model)->Forward(x, t);
  auto b = (*replica)->Forward(x, t);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(*a, *b));

  std::vector<NamedParameter> mine = (*model)->NamedParameters();
  std::vector<NamedParameter> theirs = (*replica)->NamedParameters();
  ASSERT_EQ(mine.size(), theirs.size());
  std::vector<torch::Tensor> leaves;
  for (size_t i = 0; i < mine.size(); ++i) {
    SCOPED_TRACE(mine[i].name);
    EXPECT_EQ(mine[i].name, theirs[i].name);
    EXPECT_NE(mine[i].tensor.data_ptr(), theirs[i].tensor.data_ptr());
    EXPECT_TRUE(theirs[i].tensor.is_leaf());
    EXPECT_TRUE(theirs[i].tensor.requires_grad());
    leaves.push_back(theirs[i].tensor);
  }
  auto loss = (*replica)->Forward(x, t)->square().sum();
  std::vector<torch::Tensor> grads = torch::autograd::grad({loss}, leaves);
  EXPECT_EQ(grads.size(), leaves.size());
  {
    torch::NoGradGuard no_grad;
    for (NamedParameter& p : theirs) p.tensor.add_(1.0);
  }
  auto again = (*model)->Forward(x, t);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(torch::equal(*again, *a));
}

// What this PyTorch writes and this LibTorch reads (docs/models.md,
// "Versions", quotes these lines).
TEST_F(TorchScriptModelTest, PythonFilesHaveASupportedFormatVersion) {
  const uint64_t version = manifest_["format_version"].get<uint64_t>();
  std::printf(
      "python torch %s wrote file-format version %llu; LibTorch %s reads "
      "%llu..%llu\n",
      manifest_["torch_version"].get<std::string>().c_str(),
      static_cast<unsigned long long>(version), TORCH_VERSION,
      static_cast<unsigned long long>(
          caffe2::serialize::kMinSupportedFileFormatVersion),
      static_cast<unsigned long long>(
          caffe2::serialize::kMaxSupportedFileFormatVersion));
  EXPECT_GE(version, caffe2::serialize::kMinSupportedFileFormatVersion);
  EXPECT_LE(version, caffe2::serialize::kMaxSupportedFileFormatVersion);
  // The copy that the out-of-range file is made from, rewritten with its own
  // version, loads: the refusal below is the version's alone.
  auto model = TorchScriptModel::Create(
      dir_ + "/" + manifest_["rewritten"].get<std::string>(),
      ImageShape{1, 8, 8});
  EXPECT_TRUE(model.ok()) << model.status();
}

TEST_F(TorchScriptModelTest, RefusesAnUnsupportedFormatVersion) {
  const std::string path = Refused("version99");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(
      model.status(),
      {path, "version 99",
       absl::StrCat(caffe2::serialize::kMinSupportedFileFormatVersion, "..",
                    caffe2::serialize::kMaxSupportedFileFormatVersion),
       absl::StrCat("LibTorch ", TORCH_VERSION)});
}

TEST_F(TorchScriptModelTest, RefusesATorchSaveFile) {
  const std::string path = Refused("state_dict");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(model.status(),
                {path, "no TorchScript code", "torch.jit.save"});
}

TEST_F(TorchScriptModelTest, RefusesAForwardWithOneInput) {
  const std::string path = Refused("one_input");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(model.status(),
                {path, "\"forward(Tensor x) -> Tensor\"",
                 "expected \"forward(Tensor x_t, Tensor t) -> Tensor\""});
}

TEST_F(TorchScriptModelTest, RefusesAForwardWithThreeInputs) {
  const std::string path = Refused("three_inputs");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(
      model.status(),
      {path, "\"forward(Tensor x_t, Tensor t, Tensor label) -> Tensor\"",
       "expected \"forward(Tensor x_t, Tensor t) -> Tensor\""});
}

TEST_F(TorchScriptModelTest, RefusesAForwardReturningATuple) {
  const std::string path = Refused("returns_tuple");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(model.status(),
                {path, "-> Tuple[Tensor, Tensor]\"",
                 "expected \"forward(Tensor x_t, Tensor t) -> Tensor\""});
}

TEST_F(TorchScriptModelTest, RefusesAModelWhoseOutputShapeDiffers) {
  const std::string path = Refused("shrinks");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  ExpectRefused(model.status(),
                {path, "image shape [1, 8, 8]", "a shape the model rejects",
                 "returned shape [1, 1, 4, 4]", "input shape [1, 1, 8, 8]"});
}

TEST_F(TorchScriptModelTest, RefusesAnImageShapeTheModelRaisesFor) {
  const std::string path = Refused("wants_rgb");
  auto model = TorchScriptModel::Create(path, ImageShape{1, 8, 8});
  // The model's own complaint (a 3-channel convolution) is passed on.
  ExpectRefused(model.status(), {path, "image shape [1, 8, 8]",
                                 "a shape the model rejects", "3 channels"});
  auto rgb = TorchScriptModel::Create(path, ImageShape{3, 8, 8});
  EXPECT_TRUE(rgb.ok()) << rgb.status();
}

TEST(TorchScriptModelErrorsTest, MissingFileIsNotFound) {
  const std::string path = testing::TempDir() + "/no_such_model.pt";
  auto model = TorchScriptModel::Create(path);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(model.status().message().find(path), std::string::npos);
}

TEST(TorchScriptModelErrorsTest, NonZipFileIsInvalidArgument) {
  const std::string path = testing::TempDir() + "/corrupt_model.pt";
  std::ofstream(path) << "this is not a TorchScript archive";
  auto model = TorchScriptModel::Create(path);
  ExpectRefused(model.status(), {path, "not a zip archive"});
}

TEST(TorchScriptModelErrorsTest, TruncatedFileIsInvalidArgument) {
  // The first bytes of a zip archive (a local header signature) and no
  // directory: still "not a zip archive", not a crash or a LibTorch trace.
  const std::string path = testing::TempDir() + "/truncated_model.pt";
  std::ofstream(path, std::ios::binary)
      << std::string("PK\x03\x04", 4) << std::string(40, '\0');
  auto model = TorchScriptModel::Create(path);
  ExpectRefused(model.status(), {path, "not a zip archive"});
}

}  // namespace
}  // namespace retrace::model

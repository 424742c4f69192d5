#include "server/run/model_description.h"

#include <toml++/toml.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/sha256.h"
#include "common/status.h"
#include "server/model/torchscript_model.h"

namespace retrace::run {
namespace {

namespace fs = std::filesystem;

// Reads one TOML table, remembering which keys were read so that unknown
// (usually misspelt) keys can be refused.
class Table {
 public:
  Table(const toml::table* table, std::string path, const std::string* source)
      : table_(table), path_(std::move(path)), source_(source) {}

  std::string Path(absl::string_view key) const {
    return path_.empty() ? std::string(key) : absl::StrCat(path_, ".", key);
  }
  absl::Status Error(absl::string_view key, absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(*source_, ": field '", Path(key), "' ", what));
  }
  const toml::node* Get(absl::string_view key) {
    read_.insert(std::string(key));
    return table_ == nullptr
               ? nullptr
               : table_->get(std::string_view(key.data(), key.size()));
  }
  bool Has(absl::string_view key) { return Get(key) != nullptr; }

  absl::StatusOr<std::string> String(absl::string_view key,
                                     std::optional<std::string> fallback) {
    const toml::node* n = Get(key);
    if (n == nullptr) {
      if (fallback) return *fallback;
      return Error(key, "missing");
    }
    if (!n->is_string()) return Error(key, "must be a string");
    return std::string(*n->value<std::string>());
  }
  absl::StatusOr<int64_t> Int(absl::string_view key,
                              std::optional<int64_t> fallback) {
    const toml::node* n = Get(key);
    if (n == nullptr) {
      if (fallback) return *fallback;
      return Error(key, "missing");
    }
    if (!n->is_integer()) return Error(key, "must be an integer");
    return *n->value<int64_t>();
  }
  absl::StatusOr<double> Number(absl::string_view key,
                                std::optional<double> fallback) {
    const toml::node* n = Get(key);
    if (n == nullptr) {
      if (fallback) return *fallback;
      return Error(key, "missing");
    }
    if (!n->is_number()) return Error(key, "must be a number");
    const double v = *n->value<double>();
    if (!std::isfinite(v)) return Error(key, "must be finite");
    return v;
  }
  absl::StatusOr<bool> Bool(absl::string_view key, bool fallback) {
    const toml::node* n = Get(key);
    if (n == nullptr) return fallback;
    if (!n->is_boolean()) return Error(key, "must be true or false");
    return *n->value<bool>();
  }
  absl::StatusOr<std::vector<double>> Numbers(absl::string_view key) {
    const toml::node* n = Get(key);
    if (n == nullptr) return Error(key, "missing");
    if (!n->is_array()) return Error(key, "must be an array of numbers");
    std::vector<double> out;
    for (const toml::node& e : *n->as_array()) {
      if (!e.is_number() || !std::isfinite(*e.value<double>())) {
        return Error(key, absl::StrCat("must hold finite numbers (element ",
                                       out.size(), " is not)"));
      }
      out.push_back(*e.value<double>());
    }
    return out;
  }
  // The sub-table `key`; an empty Table when absent and optional.
  absl::StatusOr<Table> Sub(absl::string_view key, bool required) {
    const toml::node* n = Get(key);
    if (n == nullptr) {
      if (required) return Error(key, "missing (a [table])");
      return Table(nullptr, Path(key), source_);
    }
    if (!n->is_table()) return Error(key, "must be a table");
    return Table(n->as_table(), Path(key), source_);
  }
  // INVALID_ARGUMENT for a key that was never asked for.
  absl::Status NoUnknownKeys() const {
    if (table_ == nullptr) return absl::OkStatus();
    for (auto&& [key, value] : *table_) {
      const std::string name(key.str());
      if (read_.count(name) == 0) {
        return Error(name, "is not a known key");
      }
    }
    return absl::OkStatus();
  }

 private:
  const toml::table* table_;
  std::string path_;
  const std::string* source_;
  std::set<std::string> read_;
};

// Checks `value` against `allowed`; the error lists them.
absl::Status CheckOneOf(Table& t, absl::string_view key,
                        const std::string& value,
                        const std::vector<std::string>& allowed) {
  for (const std::string& a : allowed) {
    if (value == a) return absl::OkStatus();
  }
  return t.Error(key, absl::StrCat("is \"", value, "\"; expected one of \"",
                                   absl::StrJoin(allowed, "\", \""), "\""));
}

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(c) && !(c >= 'a' && c <= 'f')) return false;
  }
  return true;
}

// The shortest %g form that reads back to the same double.
std::string ExactDouble(double v) {
  for (int digits = 1; digits <= 17; ++digits) {
    std::string text = absl::StrFormat("%.*g", digits, v);
    if (std::strtod(text.c_str(), nullptr) == v) {
      // TOML floats need a '.', an exponent, or inf/nan.
      if (text.find_first_of(".eEn") == std::string::npos) text += ".0";
      return text;
    }
  }
  return absl::StrFormat("%.17g", v);
}

// A TOML basic string: quotes and backslashes escaped, and every control
// character (which TOML does not allow raw in a basic string) as an escape.
std::string Quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      absl::StrAppend(&out, absl::StrFormat("\\u%04x", u));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

absl::StatusOr<ModelDescription> Parse(const toml::table& root,
                                       const std::string& source) {
  ModelDescription d;
  d.source = source;
  d.base_dir = fs::path(source).parent_path().string();
  if (d.base_dir.empty()) d.base_dir = ".";
  Table top(&root, "", &d.source);

  ASSIGN_OR_RETURN(const std::string format,
                   top.String("format", std::nullopt));
  if (format != kDescriptionFormat) {
    return top.Error("format", absl::StrCat("is \"", format, "\"; expected \"",
                                            kDescriptionFormat, "\""));
  }
  ASSIGN_OR_RETURN(const int64_t version, top.Int("version", std::nullopt));
  if (version != kDescriptionVersion) {
    return top.Error(
        "version", absl::StrCat("is ", version, "; this retrace reads version ",
                                kDescriptionVersion));
  }

  // [model]
  ASSIGN_OR_RETURN(Table model, top.Sub("model", true));
  ASSIGN_OR_RETURN(const std::string kind, model.String("kind", std::nullopt));
  RETURN_IF_ERROR(
      CheckOneOf(model, "kind", kind, {"builtin-unet", "torchscript"}));
  d.kind =
      kind == "torchscript" ? ModelKind::kTorchScript : ModelKind::kBuiltinUNet;
  if (d.kind == ModelKind::kBuiltinUNet) {
    ASSIGN_OR_RETURN(d.unet.base_channels,
                     model.Int("base_channels", d.unet.base_channels));
    if (model.Has("channel_mults")) {
      ASSIGN_OR_RETURN(std::vector<double> mults,
                       model.Numbers("channel_mults"));
      d.unet.channel_mults.clear();
      for (double m : mults) d.unet.channel_mults.push_back(int64_t(m));
    }
    ASSIGN_OR_RETURN(d.unet.attention,
                     model.Bool("attention", d.unet.attention));
    ASSIGN_OR_RETURN(d.unet.norm_groups,
                     model.Int("norm_groups", d.unet.norm_groups));
  }
  RETURN_IF_ERROR(model.NoUnknownKeys());

  // [image]
  ASSIGN_OR_RETURN(Table image, top.Sub("image", true));
  ASSIGN_OR_RETURN(d.image.channels, image.Int("channels", std::nullopt));
  ASSIGN_OR_RETURN(d.image.height, image.Int("height", std::nullopt));
  ASSIGN_OR_RETURN(d.image.width, image.Int("width", std::nullopt));
  if (d.image.channels != 1 && d.image.channels != 3) {
    return image.Error(
        "channels",
        absl::StrCat("is ", d.image.channels, "; must be 1 (gray) or 3 (RGB)"));
  }
  for (auto [key, side] :
       {std::pair<const char*, int64_t>{"height", d.image.height},
        {"width", d.image.width}}) {
    if (side < 1 || side > kMaxImageSide) {
      return image.Error(
          key, absl::StrCat("is ", side, "; must be in 1..", kMaxImageSide));
    }
  }
  if (image.Has("pixel_range")) {
    ASSIGN_OR_RETURN(std::vector<double> range, image.Numbers("pixel_range"));
    if (range.size() != 2 || !(range[0] < range[1])) {
      return image.Error("pixel_range", "must be [low, high] with low < high");
    }
    d.image.pixel_min = range[0];
    d.image.pixel_max = range[1];
  }
  RETURN_IF_ERROR(image.NoUnknownKeys());
  d.unet.image_channels = d.image.channels;
  d.unet.image_size = d.image.height;
  if (d.kind == ModelKind::kBuiltinUNet && d.image.height != d.image.width) {
    return image.Error("width", "must equal height for the built-in UNet");
  }

  // [schedule]
  ASSIGN_OR_RETURN(Table schedule, top.Sub("schedule", true));
  ASSIGN_OR_RETURN(d.schedule.type, schedule.String("type", std::nullopt));
  RETURN_IF_ERROR(CheckOneOf(schedule, "type", d.schedule.type,
                             {"cosine", "linear", "betas", "alpha_bars"}));
  const bool listed =
      d.schedule.type == "betas" || d.schedule.type == "alpha_bars";
  if (listed) {
    ASSIGN_OR_RETURN(d.schedule.values, schedule.Numbers("values"));
    ASSIGN_OR_RETURN(
        d.schedule.timesteps,
        schedule.Int("timesteps", int64_t(d.schedule.values.size())));
    if (d.schedule.timesteps != int64_t(d.schedule.values.size())) {
      return schedule.Error(
          "values",
          absl::StrCat("holds ", d.schedule.values.size(),
                       " values but timesteps is ", d.schedule.timesteps));
    }
  } else {
    ASSIGN_OR_RETURN(d.schedule.timesteps,
                     schedule.Int("timesteps", d.schedule.timesteps));
  }
  if (d.schedule.timesteps < 2 || d.schedule.timesteps > (1 << 24)) {
    return schedule.Error("timesteps", absl::StrCat("is ", d.schedule.timesteps,
                                                    "; must be in 2..2^24"));
  }
  if (d.schedule.type == "linear") {
    ASSIGN_OR_RETURN(d.schedule.beta_start,
                     schedule.Number("beta_start", d.schedule.beta_start));
    ASSIGN_OR_RETURN(d.schedule.beta_end,
                     schedule.Number("beta_end", d.schedule.beta_end));
  }
  RETURN_IF_ERROR(schedule.NoUnknownKeys());
  if (absl::Status s = CreateNoiseSchedule(d.schedule).status(); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'schedule': ", s.message()));
  }

  // [loss]
  ASSIGN_OR_RETURN(Table loss, top.Sub("loss", false));
  ASSIGN_OR_RETURN(d.loss, loss.String("type", std::string("mse")));
  RETURN_IF_ERROR(CheckOneOf(loss, "type", d.loss, {"mse", "l1"}));
  ASSIGN_OR_RETURN(d.prediction,
                   loss.String("prediction", std::string("epsilon")));
  if (d.prediction != "epsilon") {
    return loss.Error(
        "prediction",
        absl::StrCat("is \"", d.prediction,
                     "\"; retrace attributes noise-prediction models only "
                     "(\"epsilon\"); v-prediction and sample (x0) targets are "
                     "not supported"));
  }
  RETURN_IF_ERROR(loss.NoUnknownKeys());

  // [[checkpoints]]
  const toml::node* checkpoints = top.Get("checkpoints");
  if (checkpoints == nullptr || !checkpoints->is_array_of_tables() ||
      checkpoints->as_array()->empty()) {
    return top.Error("checkpoints",
                     "must list at least one [[checkpoints]] table");
  }
  int64_t c = 0;
  for (const toml::node& node : *checkpoints->as_array()) {
    Table ck(node.as_table(), absl::StrCat("checkpoints[", c, "]"), &d.source);
    CheckpointDescription entry;
    ASSIGN_OR_RETURN(entry.file, ck.String("file", std::nullopt));
    if (entry.file.empty()) return ck.Error("file", "must not be empty");
    ASSIGN_OR_RETURN(entry.weight, ck.Number("weight", std::nullopt));
    ASSIGN_OR_RETURN(entry.sha256, ck.String("sha256", std::string()));
    if (!entry.sha256.empty() && !IsHex64(entry.sha256)) {
      return ck.Error("sha256", "must be 64 lowercase hex digits");
    }
    ASSIGN_OR_RETURN(entry.step, ck.Int("step", c));
    RETURN_IF_ERROR(ck.NoUnknownKeys());
    d.checkpoints.push_back(std::move(entry));
    ++c;
  }

  // [data]
  ASSIGN_OR_RETURN(Table data, top.Sub("data", true));
  ASSIGN_OR_RETURN(d.data.source, data.String("source", std::nullopt));
  RETURN_IF_ERROR(
      CheckOneOf(data, "source", d.data.source, {"folder", "mixture"}));
  if (d.data.source == "folder") {
    ASSIGN_OR_RETURN(d.data.path, data.String("path", std::nullopt));
  } else {
    ASSIGN_OR_RETURN(d.data.spec, data.String("spec", std::nullopt));
    ASSIGN_OR_RETURN(const int64_t seed, data.Int("seed", int64_t{0}));
    if (seed < 0) return data.Error("seed", "must be >= 0");
    d.data.seed = static_cast<uint64_t>(seed);
    if (absl::Status s = data::ParseMixtureSpec(d.data.spec).status();
        !s.ok()) {
      return data.Error("spec", s.message());
    }
  }
  ASSIGN_OR_RETURN(d.data.sha256, data.String("sha256", std::string()));
  RETURN_IF_ERROR(data.NoUnknownKeys());

  // [training] (optional)
  ASSIGN_OR_RETURN(Table training, top.Sub("training", false));
  ASSIGN_OR_RETURN(d.training_run, training.String("run", std::string()));
  RETURN_IF_ERROR(training.NoUnknownKeys());

  RETURN_IF_ERROR(top.NoUnknownKeys());
  return d;
}

}  // namespace

absl::string_view ModelKindName(ModelKind kind) {
  return kind == ModelKind::kTorchScript ? "torchscript" : "builtin-unet";
}

std::string ModelDescription::Resolve(const std::string& relative) const {
  if (relative.empty() || fs::path(relative).is_absolute()) return relative;
  return (fs::path(base_dir) / relative).string();
}

absl::StatusOr<ModelDescription> ParseModelDescription(
    absl::string_view text, const std::string& source) {
  toml::table root;
  try {
    root = toml::parse(std::string_view(text.data(), text.size()), source);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ":", e.source().begin.line, ":", e.source().begin.column,
        ": not valid TOML: ", std::string(e.description())));
  }
  return Parse(root, source);
}

std::string FormatModelDescription(const ModelDescription& d) {
  std::string out = absl::StrCat(
      "# retrace model description (docs/models.md)\n",
      "format = ", Quoted(kDescriptionFormat),
      "\nversion = ", kDescriptionVersion,
      "\n\n[model]\nkind = ", Quoted(std::string(ModelKindName(d.kind))), "\n");
  if (d.kind == ModelKind::kBuiltinUNet) {
    absl::StrAppend(&out, "base_channels = ", d.unet.base_channels,
                    "\nchannel_mults = [",
                    absl::StrJoin(d.unet.channel_mults, ", "),
                    "]\nattention = ", d.unet.attention ? "true" : "false",
                    "\nnorm_groups = ", d.unet.norm_groups, "\n");
  }
  absl::StrAppend(&out, "\n[image]\nchannels = ", d.image.channels,
                  "\nheight = ", d.image.height, "\nwidth = ", d.image.width,
                  "\npixel_range = [", ExactDouble(d.image.pixel_min), ", ",
                  ExactDouble(d.image.pixel_max), "]\n");
  absl::StrAppend(&out, "\n[schedule]\ntype = ", Quoted(d.schedule.type),
                  "\ntimesteps = ", d.schedule.timesteps, "\n");
  if (d.schedule.type == "linear") {
    absl::StrAppend(&out, "beta_start = ", ExactDouble(d.schedule.beta_start),
                    "\nbeta_end = ", ExactDouble(d.schedule.beta_end), "\n");
  }
  if (!d.schedule.values.empty()) {
    std::vector<std::string> values;
    for (double v : d.schedule.values) values.push_back(ExactDouble(v));
    absl::StrAppend(&out, "values = [", absl::StrJoin(values, ", "), "]\n");
  }
  absl::StrAppend(&out, "\n[loss]\ntype = ", Quoted(d.loss),
                  "\nprediction = ", Quoted(d.prediction), "\n");
  for (const CheckpointDescription& c : d.checkpoints) {
    absl::StrAppend(&out, "\n[[checkpoints]]\nfile = ", Quoted(c.file),
                    "\nweight = ", ExactDouble(c.weight), "\n");
    if (!c.sha256.empty()) {
      absl::StrAppend(&out, "sha256 = ", Quoted(c.sha256), "\n");
    }
    absl::StrAppend(&out, "step = ", c.step, "\n");
  }
  absl::StrAppend(&out, "\n[data]\nsource = ", Quoted(d.data.source), "\n");
  if (d.data.source == "folder") {
    absl::StrAppend(&out, "path = ", Quoted(d.data.path), "\n");
  } else {
    absl::StrAppend(&out, "spec = ", Quoted(d.data.spec),
                    "\nseed = ", d.data.seed, "\n");
  }
  if (!d.data.sha256.empty()) {
    absl::StrAppend(&out, "sha256 = ", Quoted(d.data.sha256), "\n");
  }
  if (!d.training_run.empty()) {
    absl::StrAppend(&out, "\n[training]\nrun = ", Quoted(d.training_run), "\n");
  }
  return out;
}

absl::StatusOr<ModelDescription> LoadModelDescription(const std::string& path,
                                                      bool verify_checksums) {
  std::string file = path;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    file = (fs::path(path) / kModelDescriptionFile).string();
  }
  absl::StatusOr<std::string> text = ReadFile(file);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("model description ", file, ": ",
                                     text.status().message()));
  }
  ASSIGN_OR_RETURN(ModelDescription d, ParseModelDescription(*text, file));
  for (size_t c = 0; c < d.checkpoints.size(); ++c) {
    CheckpointDescription& ck = d.checkpoints[c];
    const std::string resolved = d.Resolve(ck.file);
    if (!fs::is_regular_file(resolved, ec)) {
      return absl::NotFoundError(
          absl::StrCat(file, ": field 'checkpoints[", c, "].file': ", resolved,
                       " does not exist or is not a file"));
    }
    if (ck.sha256.empty() || verify_checksums) {
      ASSIGN_OR_RETURN(const std::string actual, Sha256File(resolved));
      if (ck.sha256.empty()) {
        ck.sha256 = actual;
      } else if (actual != ck.sha256) {
        return absl::DataLossError(absl::StrCat(
            file, ": field 'checkpoints[", c, "].sha256': ", resolved,
            " has sha256 ", actual, " but the description records ", ck.sha256,
            " (was the checkpoint changed?)"));
      }
    }
  }
  return d;
}

absl::StatusOr<model::NoiseSchedule> CreateNoiseSchedule(
    const ScheduleDescription& s) {
  ASSIGN_OR_RETURN(const model::ScheduleType type,
                   model::ParseScheduleType(s.type));
  switch (type) {
    case model::ScheduleType::kCosine:
      return model::NoiseSchedule::Create(type, static_cast<int>(s.timesteps));
    case model::ScheduleType::kLinear:
      return model::NoiseSchedule::CreateLinear(static_cast<int>(s.timesteps),
                                                s.beta_start, s.beta_end);
    case model::ScheduleType::kBetas:
      return model::NoiseSchedule::FromBetas(s.values);
    case model::ScheduleType::kAlphaBars:
      return model::NoiseSchedule::FromAlphaBars(s.values);
  }
  return absl::InternalError("unhandled schedule type");
}

absl::StatusOr<model::LossType> LossTypeOf(const ModelDescription& d) {
  return model::ParseLossType(d.loss);
}

absl::StatusOr<std::unique_ptr<model::DiffusionModel>> LoadCheckpointModel(
    const ModelDescription& d, int64_t checkpoint) {
  if (checkpoint < 0 || checkpoint >= int64_t(d.checkpoints.size())) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", checkpoint,
                                                   " out of range [0, ",
                                                   d.checkpoints.size(), ")"));
  }
  const std::string field = absl::StrCat("checkpoints[", checkpoint, "].file");
  const std::string file = d.Resolve(d.checkpoints[checkpoint].file);
  auto annotate = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(d.source, ": field '", field,
                                               "': ", s.message()));
  };
  std::unique_ptr<model::DiffusionModel> net;
  if (d.kind == ModelKind::kTorchScript) {
    absl::StatusOr<std::unique_ptr<model::TorchScriptModel>> ts =
        model::TorchScriptModel::Create(file, d.shape());
    if (!ts.ok()) return annotate(ts.status());
    net = std::move(*ts);
  } else {
    absl::StatusOr<std::unique_ptr<model::UNetModel>> unet =
        model::UNetModel::Create(d.unet, /*seed=*/0);
    if (!unet.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(d.source, ": field 'model': ", unet.status().message()));
    }
    if (absl::Status s = (*unet)->Load(file); !s.ok()) return annotate(s);
    net = std::move(*unet);
  }
  return net;
}

absl::StatusOr<data::MixtureSpec> TrainingMixtureSpec(
    const ModelDescription& d) {
  if (d.data.source == "folder") {
    const std::string root = fs::absolute(d.Resolve(d.data.path)).string();
    if (root.find_first_of(":+") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          d.source, ": field 'data.path': ", root,
          " contains ':' or '+', which image folder paths cannot hold"));
    }
    data::MixtureSpec spec;
    data::MixtureComponent folder;
    folder.source = "folder";
    folder.path = root;
    spec.components.push_back(folder);
    spec.shuffle = false;
    return spec;
  }
  absl::StatusOr<data::MixtureSpec> spec = data::ParseMixtureSpec(d.data.spec);
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        d.source, ": field 'data.spec': ", spec.status().message()));
  }
  spec->seed = d.data.seed;
  return spec;
}

absl::StatusOr<data::Mixture> LoadTrainingData(const ModelDescription& d,
                                               data::DataLocations locations) {
  ASSIGN_OR_RETURN(const data::MixtureSpec spec, TrainingMixtureSpec(d));
  locations.folder_spec.channels = d.image.channels;
  locations.folder_spec.height = d.image.height;
  locations.folder_spec.width = d.image.width;
  absl::StatusOr<data::Mixture> mixture = data::BuildMixture(spec, locations);
  if (!mixture.ok()) {
    return absl::Status(
        mixture.status().code(),
        absl::StrCat(d.source, ": field 'data': ", mixture.status().message()));
  }
  if (mixture->images.channels != d.image.channels ||
      mixture->images.height != d.image.height ||
      mixture->images.width != d.image.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        d.source, ": field 'data': the images are ", mixture->images.channels,
        "x", mixture->images.height, "x", mixture->images.width,
        " but [image] says ", d.image.channels, "x", d.image.height, "x",
        d.image.width));
  }
  return mixture;
}

void ToModelRange(const ImageDescription& image, float* pixels, int64_t count) {
  if (image.pixel_min == -1.0 && image.pixel_max == 1.0) return;
  const double scale = (image.pixel_max - image.pixel_min) / 2.0;
  for (int64_t i = 0; i < count; ++i) {
    pixels[i] =
        static_cast<float>(image.pixel_min + (double(pixels[i]) + 1.0) * scale);
  }
}

void RecordInStoreSpec(const ModelDescription& d, store::StoreSpec* spec) {
  spec->model.architecture = d.kind == ModelKind::kTorchScript
                                 ? model::kTorchScriptArchitecture
                                 : model::kUNetArchitecture;
  spec->model.checkpoints.clear();
  for (const CheckpointDescription& c : d.checkpoints) {
    store::CheckpointInfo info;
    info.file = c.file;  // as written: parts built elsewhere record the same
    info.sha256 = c.sha256;
    info.weight = c.weight;
    info.step = c.step;
    spec->model.checkpoints.push_back(info);
  }
  spec->model.image = {d.image.channels, d.image.height, d.image.width,
                       d.image.pixel_min, d.image.pixel_max};
  spec->model.prediction = d.prediction;
  spec->noise_schedule.type = d.schedule.type;
  spec->noise_schedule.timesteps = d.schedule.timesteps;
  spec->noise_schedule.beta_start = d.schedule.beta_start;
  spec->noise_schedule.beta_end = d.schedule.beta_end;
  spec->noise_schedule.values = d.schedule.values;
  spec->loss = d.loss;
}

absl::Status CheckMatchesStore(const ModelDescription& d,
                               const store::StoreSpec& spec) {
  store::StoreSpec mine = spec;
  RecordInStoreSpec(d, &mine);
  auto differ = [&](absl::string_view field, const std::string& ours,
                    const std::string& theirs) {
    return absl::FailedPreconditionError(
        absl::StrCat(d.source, " does not describe the store's model: ", field,
                     " is ", ours, " here but ", theirs,
                     " in the store (is this the store's "
                     "model description?)"));
  };
  if (mine.model.architecture != spec.model.architecture) {
    return differ("the architecture", mine.model.architecture,
                  spec.model.architecture);
  }
  if (mine.model.checkpoints.size() != spec.model.checkpoints.size()) {
    return differ("the checkpoint count",
                  absl::StrCat(mine.model.checkpoints.size()),
                  absl::StrCat(spec.model.checkpoints.size()));
  }
  for (size_t c = 0; c < mine.model.checkpoints.size(); ++c) {
    if (mine.model.checkpoints[c].sha256 != spec.model.checkpoints[c].sha256) {
      return differ(absl::StrCat("the sha256 of checkpoints[", c, "] (",
                                 d.checkpoints[c].file, ")"),
                    mine.model.checkpoints[c].sha256,
                    spec.model.checkpoints[c].sha256);
    }
  }
  // Stores written before descriptions existed record no image (1×28×28 in
  // [−1, 1] then) and no prediction.
  store::ImageInfo theirs = spec.model.image;
  if (theirs.channels == 0) theirs = {1, 28, 28, -1.0, 1.0};
  const store::ImageInfo& ours = mine.model.image;
  if (!(ours == theirs)) {
    auto text = [](const store::ImageInfo& i) {
      return absl::StrCat(i.channels, "x", i.height, "x", i.width, " in [",
                          i.pixel_min, ", ", i.pixel_max, "]");
    };
    return differ("the image", text(ours), text(theirs));
  }
  if (mine.noise_schedule.type != spec.noise_schedule.type ||
      !(mine.noise_schedule == spec.noise_schedule)) {
    return differ("the noise schedule",
                  absl::StrCat(mine.noise_schedule.type, " over ",
                               mine.noise_schedule.timesteps, " steps"),
                  absl::StrCat(spec.noise_schedule.type, " over ",
                               spec.noise_schedule.timesteps, " steps"));
  }
  if (mine.loss != spec.loss) return differ("the loss", mine.loss, spec.loss);
  return absl::OkStatus();
}

}  // namespace retrace::run

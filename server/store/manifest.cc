#include "server/store/manifest.h"

#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "common/status.h"

namespace retrace::store {
namespace {

using nlohmann::json;

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char ch : s) {
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
  }
  return true;
}

// A shard file must stay inside the store directory.
bool IsSafeFileName(const std::string& s) {
  return !s.empty() && s != "." && s != ".." &&
         s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}

absl::Status FieldError(absl::string_view path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("field '", path, "' ", what));
}

// Typed access to the members of one JSON object, with errors that name the
// member by its full path ("projection.dim").
class Fields {
 public:
  Fields(const json& object, std::string prefix)
      : object_(object), prefix_(std::move(prefix)) {}

  std::string Path(absl::string_view name) const {
    return prefix_.empty() ? std::string(name)
                           : absl::StrCat(prefix_, ".", name);
  }

  bool Has(absl::string_view name) const {
    return object_.find(std::string(name)) != object_.end();
  }

  absl::StatusOr<const json*> Get(absl::string_view name) const {
    auto it = object_.find(std::string(name));
    if (it == object_.end()) return FieldError(Path(name), "missing");
    return &*it;
  }

  absl::StatusOr<Fields> Object(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (!j->is_object()) return FieldError(Path(name), "must be an object");
    return Fields(*j, Path(name));
  }

  absl::StatusOr<const json*> Array(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (!j->is_array()) return FieldError(Path(name), "must be an array");
    return j;
  }

  absl::StatusOr<std::string> String(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (!j->is_string()) return FieldError(Path(name), "must be a string");
    return j->get<std::string>();
  }

  absl::StatusOr<bool> Bool(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (!j->is_boolean())
      return FieldError(Path(name), "must be true or false");
    return j->get<bool>();
  }

  absl::StatusOr<int64_t> Int(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    return IntValue(*j, Path(name));
  }

  absl::StatusOr<uint64_t> Uint64(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (j->is_number_unsigned()) return j->get<uint64_t>();
    if (j->is_number_integer() && j->get<int64_t>() >= 0) {
      return uint64_t(j->get<int64_t>());
    }
    return FieldError(Path(name), "must be a non-negative integer below 2^64");
  }

  absl::StatusOr<double> Number(absl::string_view name) const {
    ASSIGN_OR_RETURN(const json* j, Get(name));
    if (!j->is_number()) return FieldError(Path(name), "must be a number");
    return j->get<double>();
  }

  static absl::StatusOr<int64_t> IntValue(const json& j,
                                          const std::string& path) {
    if (j.is_number_integer() && !j.is_number_unsigned())
      return j.get<int64_t>();
    if (j.is_number_unsigned() &&
        j.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max())) {
      return int64_t(j.get<uint64_t>());
    }
    return FieldError(path, "must be an integer");
  }

 private:
  const json& object_;
  std::string prefix_;
};

template <typename Enum, size_t N>
absl::StatusOr<Enum> ParseEnum(const Fields& f, absl::string_view name,
                               const std::pair<const char*, Enum> (&names)[N]) {
  ASSIGN_OR_RETURN(std::string value, f.String(name));
  std::string allowed;
  for (const auto& [text, e] : names) {
    if (value == text) return e;
    absl::StrAppend(&allowed, allowed.empty() ? "" : ", ", "\"", text, "\"");
  }
  return FieldError(
      f.Path(name),
      absl::StrCat("is \"", value, "\"; expected one of ", allowed));
}

// A name from `names`; otherwise an error listing them.
template <size_t N>
absl::StatusOr<std::string> ParseName(const Fields& f, absl::string_view name,
                                      const char* const (&names)[N]) {
  ASSIGN_OR_RETURN(std::string value, f.String(name));
  std::string allowed;
  for (const char* text : names) {
    if (value == text) return value;
    absl::StrAppend(&allowed, allowed.empty() ? "" : ", ", "\"", text, "\"");
  }
  return FieldError(
      f.Path(name),
      absl::StrCat("is \"", value, "\"; expected one of ", allowed));
}

template <size_t N>
bool IsOneOf(const std::string& value, const char* const (&names)[N]) {
  for (const char* text : names) {
    if (value == text) return true;
  }
  return false;
}

bool IsExplicitSchedule(const std::string& type) {
  return type == "betas" || type == "alpha_bars";
}
constexpr std::pair<const char*, ProjectionType> kProjectionNames[] = {
    {"sjlt", ProjectionType::kSjlt},
    {"rademacher", ProjectionType::kRademacher}};

std::string Dump(const json& j, int indent) { return j.dump(indent); }

}  // namespace

bool CheckpointInfo::operator==(const CheckpointInfo& o) const {
  return file == o.file && sha256 == o.sha256 && weight == o.weight &&
         step == o.step;
}
bool ImageInfo::operator==(const ImageInfo& o) const {
  return channels == o.channels && height == o.height && width == o.width &&
         pixel_min == o.pixel_min && pixel_max == o.pixel_max;
}
bool ModelInfo::operator==(const ModelInfo& o) const {
  return architecture == o.architecture && checkpoints == o.checkpoints &&
         image == o.image && prediction == o.prediction;
}
bool NoiseScheduleInfo::operator==(const NoiseScheduleInfo& o) const {
  if (type != o.type || timesteps != o.timesteps || values != o.values) {
    return false;
  }
  return type != "linear" ||
         (beta_start == o.beta_start && beta_end == o.beta_end);
}
bool BucketInfo::operator==(const BucketInfo& o) const {
  return edges == o.edges && replay == o.replay;
}
bool ProjectionInfo::operator==(const ProjectionInfo& o) const {
  return type == o.type && dim == o.dim && sparsity == o.sparsity &&
         seed == o.seed && param_regex == o.param_regex &&
         input_dim == o.input_dim;
}
bool StoreSpec::operator==(const StoreSpec& o) const {
  return model == o.model && noise_schedule == o.noise_schedule &&
         loss == o.loss && buckets == o.buckets && projection == o.projection &&
         grad_timesteps == o.grad_timesteps && dtype == o.dtype &&
         samples_per_shard == o.samples_per_shard && dataset == o.dataset;
}
bool ShardInfo::operator==(const ShardInfo& o) const {
  return file == o.file && first == o.first && count == o.count &&
         sha256 == o.sha256;
}

absl::Status StoreSpec::Validate() const {
  if (model.architecture.empty())
    return FieldError("model.architecture", "must not be empty");
  if (model.checkpoints.empty()) {
    return FieldError("model.checkpoints", "must list at least one checkpoint");
  }
  for (size_t c = 0; c < model.checkpoints.size(); ++c) {
    const CheckpointInfo& ck = model.checkpoints[c];
    std::string path = absl::StrCat("model.checkpoints[", c, "]");
    if (ck.file.empty()) return FieldError(path + ".file", "must not be empty");
    if (!IsHex64(ck.sha256)) {
      return FieldError(path + ".sha256", "must be 64 lowercase hex digits");
    }
    if (!std::isfinite(ck.weight))
      return FieldError(path + ".weight", "must be finite");
    if (ck.step < 0) return FieldError(path + ".step", "must be >= 0");
  }
  const ImageInfo& image = model.image;
  if (image.channels != 0 &&
      (image.channels < 1 || image.height < 1 || image.width < 1)) {
    return FieldError("model.image", "channels, height and width must be >= 1");
  }
  if (!(std::isfinite(image.pixel_min) && std::isfinite(image.pixel_max) &&
        image.pixel_min < image.pixel_max)) {
    return FieldError("model.image.pixel_range",
                      "must be two finite values, the first below the second");
  }
  const NoiseScheduleInfo& ns = noise_schedule;
  if (!IsOneOf(ns.type, kScheduleTypeNames)) {
    return FieldError("noise_schedule.type",
                      absl::StrCat("is \"", ns.type, "\", not a known schedule"));
  }
  if (ns.timesteps < 1) {
    return FieldError("noise_schedule.timesteps",
                      absl::StrCat("must be >= 1, got ", ns.timesteps));
  }
  if (ns.type == "linear" &&
      !(ns.beta_start > 0 && ns.beta_start <= ns.beta_end && ns.beta_end < 1)) {
    return FieldError(
        "noise_schedule.beta_start",
        "and beta_end must satisfy 0 < beta_start <= beta_end < 1");
  }
  if (IsExplicitSchedule(ns.type) !=
      (static_cast<int64_t>(ns.values.size()) == ns.timesteps)) {
    return FieldError(
        "noise_schedule.values",
        absl::StrCat("must hold noise_schedule.timesteps (", ns.timesteps,
                     ") values for \"betas\" and \"alpha_bars\" and be "
                     "absent otherwise; got ",
                     ns.values.size()));
  }
  if (!IsOneOf(loss, kLossNames)) {
    return FieldError("loss", absl::StrCat("is \"", loss, "\", not a known loss"));
  }
  const std::vector<int64_t>& e = buckets.edges;
  if (e.size() < 2)
    return FieldError("buckets.edges", "must hold at least two edges");
  if (e.front() != 0 || e.back() != ns.timesteps) {
    return FieldError(
        "buckets.edges",
        absl::StrCat("must run from 0 to noise_schedule.timesteps (",
                     ns.timesteps, ")"));
  }
  for (size_t i = 1; i < e.size(); ++i) {
    if (e[i] <= e[i - 1])
      return FieldError("buckets.edges", "must be strictly increasing");
  }
  if (projection.dim < 1) {
    return FieldError("projection.dim",
                      absl::StrCat("must be >= 1, got ", projection.dim));
  }
  if (projection.input_dim < 1) {
    return FieldError("projection.input_dim",
                      absl::StrCat("must be >= 1, got ", projection.input_dim));
  }
  if (projection.type == ProjectionType::kSjlt &&
      (projection.sparsity < 1 || projection.sparsity > 8)) {
    return FieldError(
        "projection.sparsity",
        absl::StrCat("must be in 1..8 for sjlt, got ", projection.sparsity));
  }
  if (projection.sparsity < 0)
    return FieldError("projection.sparsity", "must be >= 0");
  if (grad_timesteps < 1) {
    return FieldError("grad_timesteps",
                      absl::StrCat("must be >= 1, got ", grad_timesteps));
  }
  if (samples_per_shard < 1) {
    return FieldError("samples_per_shard",
                      absl::StrCat("must be >= 1, got ", samples_per_shard));
  }
  if (dtype != kernels::DType::kF16 && dtype != kernels::DType::kBF16 &&
      dtype != kernels::DType::kF32) {
    return FieldError("dtype", "must be F16, BF16 or F32");
  }
  // One row must stay far below 2^63 bytes even for huge shards.
  if (num_checkpoints() * num_slots() > (int64_t(1) << 20) ||
      projection.dim > (int64_t(1) << 24)) {
    return FieldError("projection.dim",
                      "times checkpoints and slots is too large");
  }
  // One shard's vectors must stay far from int64 overflow (2^60 bytes).
  const int64_t row_bytes = num_checkpoints() * num_slots() * projection.dim *
                            kernels::DTypeSize(dtype);
  if (samples_per_shard > (int64_t(1) << 60) / row_bytes) {
    return FieldError("samples_per_shard",
                      absl::StrCat("is too large for rows of ", row_bytes,
                                   " bytes, got ", samples_per_shard));
  }
  if (!dataset.is_object()) return FieldError("dataset", "must be an object");
  auto name = dataset.find("name");
  if (name == dataset.end() || !name->is_string()) {
    return FieldError("dataset.name", "missing (must be a string)");
  }
  return absl::OkStatus();
}

void StoreSpec::ToJson(json* out) const {
  json& j = *out;
  json checkpoints = json::array();
  for (const CheckpointInfo& ck : model.checkpoints) {
    checkpoints.push_back({{"file", ck.file},
                           {"sha256", ck.sha256},
                           {"weight", ck.weight},
                           {"step", ck.step}});
  }
  j["model"] = {{"architecture", model.architecture},
                {"checkpoints", std::move(checkpoints)}};
  if (model.image.channels != 0) {
    j["model"]["image"] = {
        {"channels", model.image.channels},
        {"height", model.image.height},
        {"width", model.image.width},
        {"pixel_range", {model.image.pixel_min, model.image.pixel_max}}};
  }
  if (!model.prediction.empty()) j["model"]["prediction"] = model.prediction;
  json schedule = {{"type", noise_schedule.type},
                   {"timesteps", noise_schedule.timesteps}};
  if (noise_schedule.type == "linear") {
    schedule["beta_start"] = noise_schedule.beta_start;
    schedule["beta_end"] = noise_schedule.beta_end;
  }
  if (!noise_schedule.values.empty()) {
    schedule["values"] = noise_schedule.values;
  }
  j["noise_schedule"] = std::move(schedule);
  j["loss"] = loss;
  j["buckets"] = {{"edges", buckets.edges}, {"replay", buckets.replay}};
  j["projection"] = {{"type", kernels::ProjectionTypeName(projection.type)},
                     {"dim", projection.dim},
                     {"sparsity", projection.sparsity},
                     {"seed", projection.seed},
                     {"param_regex", projection.param_regex},
                     {"input_dim", projection.input_dim}};
  j["grad_timesteps"] = grad_timesteps;
  j["dtype"] = kernels::DTypeName(dtype);
  j["samples_per_shard"] = samples_per_shard;
  j["dataset"] = dataset;
}

absl::StatusOr<StoreSpec> StoreSpec::FromJson(const json& j,
                                              absl::string_view source) {
  auto parse = [&]() -> absl::StatusOr<StoreSpec> {
    if (!j.is_object()) return absl::InvalidArgumentError("not a JSON object");
    Fields root(j, "");
    StoreSpec spec;

    ASSIGN_OR_RETURN(Fields model, root.Object("model"));
    ASSIGN_OR_RETURN(spec.model.architecture, model.String("architecture"));
    ASSIGN_OR_RETURN(const json* checkpoints, model.Array("checkpoints"));
    for (size_t c = 0; c < checkpoints->size(); ++c) {
      std::string path = absl::StrCat("model.checkpoints[", c, "]");
      const json& entry = (*checkpoints)[c];
      if (!entry.is_object()) return FieldError(path, "must be an object");
      Fields f(entry, path);
      CheckpointInfo ck;
      ASSIGN_OR_RETURN(ck.file, f.String("file"));
      ASSIGN_OR_RETURN(ck.sha256, f.String("sha256"));
      ASSIGN_OR_RETURN(ck.weight, f.Number("weight"));
      ASSIGN_OR_RETURN(ck.step, f.Int("step"));
      spec.model.checkpoints.push_back(std::move(ck));
    }
    if (model.Has("image")) {
      ASSIGN_OR_RETURN(Fields image, model.Object("image"));
      ASSIGN_OR_RETURN(spec.model.image.channels, image.Int("channels"));
      ASSIGN_OR_RETURN(spec.model.image.height, image.Int("height"));
      ASSIGN_OR_RETURN(spec.model.image.width, image.Int("width"));
      ASSIGN_OR_RETURN(const json* range, image.Array("pixel_range"));
      if (range->size() != 2 || !(*range)[0].is_number() ||
          !(*range)[1].is_number()) {
        return FieldError("model.image.pixel_range", "must be two numbers");
      }
      spec.model.image.pixel_min = (*range)[0].get<double>();
      spec.model.image.pixel_max = (*range)[1].get<double>();
    }
    if (model.Has("prediction")) {
      ASSIGN_OR_RETURN(spec.model.prediction, model.String("prediction"));
    }

    ASSIGN_OR_RETURN(Fields schedule, root.Object("noise_schedule"));
    ASSIGN_OR_RETURN(spec.noise_schedule.type,
                     ParseName(schedule, "type", kScheduleTypeNames));
    ASSIGN_OR_RETURN(spec.noise_schedule.timesteps, schedule.Int("timesteps"));
    if (IsExplicitSchedule(spec.noise_schedule.type)) {
      ASSIGN_OR_RETURN(const json* values, schedule.Array("values"));
      for (size_t i = 0; i < values->size(); ++i) {
        if (!(*values)[i].is_number()) {
          return FieldError(absl::StrCat("noise_schedule.values[", i, "]"),
                            "must be a number");
        }
        spec.noise_schedule.values.push_back((*values)[i].get<double>());
      }
    }
    if (spec.noise_schedule.type == "linear") {
      ASSIGN_OR_RETURN(spec.noise_schedule.beta_start,
                       schedule.Number("beta_start"));
      ASSIGN_OR_RETURN(spec.noise_schedule.beta_end,
                       schedule.Number("beta_end"));
    }

    ASSIGN_OR_RETURN(spec.loss, ParseName(root, "loss", kLossNames));

    ASSIGN_OR_RETURN(Fields buckets, root.Object("buckets"));
    ASSIGN_OR_RETURN(const json* edges, buckets.Array("edges"));
    for (size_t i = 0; i < edges->size(); ++i) {
      ASSIGN_OR_RETURN(
          int64_t edge,
          Fields::IntValue((*edges)[i],
                           absl::StrCat("buckets.edges[", i, "]")));
      spec.buckets.edges.push_back(edge);
    }
    ASSIGN_OR_RETURN(spec.buckets.replay, buckets.Bool("replay"));

    ASSIGN_OR_RETURN(Fields projection, root.Object("projection"));
    ASSIGN_OR_RETURN(spec.projection.type,
                     ParseEnum(projection, "type", kProjectionNames));
    ASSIGN_OR_RETURN(spec.projection.dim, projection.Int("dim"));
    ASSIGN_OR_RETURN(spec.projection.sparsity, projection.Int("sparsity"));
    ASSIGN_OR_RETURN(spec.projection.seed, projection.Uint64("seed"));
    ASSIGN_OR_RETURN(spec.projection.param_regex,
                     projection.String("param_regex"));
    ASSIGN_OR_RETURN(spec.projection.input_dim, projection.Int("input_dim"));

    ASSIGN_OR_RETURN(spec.grad_timesteps, root.Int("grad_timesteps"));
    ASSIGN_OR_RETURN(std::string dtype, root.String("dtype"));
    if (!kernels::ParseDType(dtype.c_str(), &spec.dtype)) {
      return FieldError("dtype", absl::StrCat("is \"", dtype,
                                              "\"; expected F16, BF16 or F32"));
    }
    ASSIGN_OR_RETURN(spec.samples_per_shard, root.Int("samples_per_shard"));
    ASSIGN_OR_RETURN(const json* dataset, root.Get("dataset"));
    spec.dataset = *dataset;
    RETURN_IF_ERROR(spec.Validate());
    return spec;
  };
  absl::StatusOr<StoreSpec> spec = parse();
  if (!spec.ok()) return Annotate(spec.status(), source);
  return spec;
}

absl::StatusOr<std::string> StoreSpec::CanonicalJson() const {
  json j = json::object();
  ToJson(&j);
  try {
    return Dump(j, -1);
  } catch (const json::exception& e) {
    // Strings that are not valid UTF-8 cannot be written as JSON.
    return absl::InvalidArgumentError(absl::StrCat("store spec: ", e.what()));
  }
}

absl::StatusOr<std::string> StoreSpec::Sha256() const {
  ASSIGN_OR_RETURN(std::string text, CanonicalJson());
  return Sha256Hex(text);
}

absl::StatusOr<std::string> ComputeStoreId(
    const StoreSpec& spec, int64_t num_samples,
    const std::vector<ShardInfo>& shards) {
  ASSIGN_OR_RETURN(std::string spec_json, spec.CanonicalJson());
  retrace::Sha256 h;
  std::string head = absl::StrCat(kFormatName, "/", kFormatVersion, "\n",
                                  spec_json, "\n", num_samples, "\n");
  h.Update(head.data(), head.size());
  for (const ShardInfo& s : shards) {
    std::string line = s.sha256 + "\n";
    h.Update(line.data(), line.size());
  }
  return h.HexDigest();
}

json Manifest::ToJson() const {
  json j = json::object();
  spec.ToJson(&j);
  j["format"] = kFormatName;
  j["format_version"] = kFormatVersion;
  j["store_id"] = store_id;
  j["num_samples"] = num_samples;
  json list = json::array();
  for (const ShardInfo& s : shards) {
    list.push_back({{"file", s.file},
                    {"first", s.first},
                    {"count", s.count},
                    {"sha256", s.sha256}});
  }
  j["shards"] = std::move(list);
  j["diagnostics"] = diagnostics;
  return j;
}

absl::StatusOr<std::string> Manifest::Serialize() const {
  try {
    return Dump(ToJson(), 2) + "\n";
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("manifest: ", e.what()));
  }
}

absl::Status Manifest::Validate(absl::string_view source) const {
  auto check = [&]() -> absl::Status {
    RETURN_IF_ERROR(spec.Validate());
    if (!IsHex64(store_id))
      return FieldError("store_id", "must be 64 lowercase hex digits");
    if (num_samples < 0) return FieldError("num_samples", "must be >= 0");
    if (!diagnostics.is_object())
      return FieldError("diagnostics", "must be an object");
    int64_t next = 0;
    std::set<std::string> files;
    for (size_t i = 0; i < shards.size(); ++i) {
      const ShardInfo& s = shards[i];
      std::string path = absl::StrCat("shards[", i, "]");
      if (!IsSafeFileName(s.file)) {
        return FieldError(
            path + ".file",
            absl::StrCat("\"", s.file, "\" must be a plain file name"));
      }
      if (!files.insert(s.file).second) {
        return FieldError(path + ".file",
                          absl::StrCat("\"", s.file, "\" is listed twice"));
      }
      if (s.first != next) {
        return FieldError(path + ".first",
                          absl::StrCat("is ", s.first, ", expected ", next,
                                       " (shards must be contiguous from 0)"));
      }
      if (s.count < 1) return FieldError(path + ".count", "must be >= 1");
      if (!IsHex64(s.sha256)) {
        return FieldError(path + ".sha256", "must be 64 lowercase hex digits");
      }
      if (__builtin_add_overflow(next, s.count, &next)) {
        return FieldError(path + ".count", "overflows");
      }
    }
    if (next != num_samples) {
      return FieldError("num_samples", absl::StrCat("is ", num_samples,
                                                    " but the shards hold ",
                                                    next, " samples"));
    }
    return absl::OkStatus();
  };
  return Annotate(check(), source);
}

absl::StatusOr<Manifest> Manifest::FromJson(const json& j,
                                            absl::string_view source) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not a JSON object"));
  }
  Fields root(j, "");
  absl::StatusOr<std::string> format = root.String("format");
  if (!format.ok()) return Annotate(format.status(), source);
  if (*format != kFormatName) {
    return absl::FailedPreconditionError(
        absl::StrCat(source, ": field 'format' is \"", *format,
                     "\", expected \"", kFormatName, "\""));
  }
  absl::StatusOr<int64_t> version = root.Int("format_version");
  if (!version.ok()) return Annotate(version.status(), source);
  if (*version != kFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat(source, ": field 'format_version' is ", *version,
                     "; this build reads version ", kFormatVersion));
  }
  Manifest m;
  ASSIGN_OR_RETURN(m.spec, StoreSpec::FromJson(j, source));
  auto rest = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(m.store_id, root.String("store_id"));
    ASSIGN_OR_RETURN(m.num_samples, root.Int("num_samples"));
    ASSIGN_OR_RETURN(const json* shards, root.Array("shards"));
    for (size_t i = 0; i < shards->size(); ++i) {
      std::string path = absl::StrCat("shards[", i, "]");
      if (!(*shards)[i].is_object())
        return FieldError(path, "must be an object");
      Fields f((*shards)[i], path);
      ShardInfo s;
      ASSIGN_OR_RETURN(s.file, f.String("file"));
      ASSIGN_OR_RETURN(s.first, f.Int("first"));
      ASSIGN_OR_RETURN(s.count, f.Int("count"));
      ASSIGN_OR_RETURN(s.sha256, f.String("sha256"));
      m.shards.push_back(std::move(s));
    }
    if (root.Has("diagnostics")) {
      ASSIGN_OR_RETURN(const json* diagnostics, root.Get("diagnostics"));
      m.diagnostics = *diagnostics;
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(Annotate(rest(), source));
  RETURN_IF_ERROR(m.Validate(source));
  return m;
}

absl::StatusOr<Manifest> Manifest::Parse(absl::string_view text,
                                         absl::string_view source) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": malformed JSON: ", e.what()));
  }
  return FromJson(j, source);
}

}  // namespace retrace::store

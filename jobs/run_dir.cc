#include "jobs/run_dir.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/sha256.h"
#include "server/model/replay.h"

namespace retrace::jobs {
namespace {

using nlohmann::json;

// The part of run.json that identifies a run: compared on resume.
json IdentityJson(const RunManifest& m) {
  const TrainConfig& c = m.config;
  json model = {{"architecture", "unet"},
                {"base_channels", c.model.base_channels},
                {"channel_mults", c.model.channel_mults},
                {"attention", c.model.attention},
                {"norm_groups", c.model.norm_groups},
                {"image_channels", m.dataset.channels},
                {"image_size", m.dataset.height},
                {"init_seed", c.run_seed},
                {"parameter_count", m.parameter_count}};
  json dataset = {{"spec", c.dataset_spec},
                  {"seed", c.dataset_seed},
                  {"num_samples", m.dataset.num_samples},
                  {"channels", m.dataset.channels},
                  {"height", m.dataset.height},
                  {"width", m.dataset.width},
                  {"sha256", m.dataset.sha256}};
  return json{
      {"dataset", std::move(dataset)},
      {"model", std::move(model)},
      {"schedule",
       {{"type", std::string(model::ScheduleTypeName(c.schedule))},
        {"num_timesteps", c.num_timesteps}}},
      {"loss", std::string(model::LossTypeName(c.loss))},
      {"optimizer",
       {{"type", "adam"},
        {"lr", c.learning_rate},
        {"beta1", kAdamBeta1},
        {"beta2", kAdamBeta2},
        {"eps", kAdamEps}}},
      {"batch_size", c.batch_size},
      {"steps", c.steps},
      {"checkpoint_every", c.checkpoint_every},
      {"run_seed", c.run_seed},
      {"batch_order", kBatchOrderName},
  };
}

// Reads a field with a message naming it; nlohmann's own exceptions are
// turned into DATA_LOSS by the caller.
template <typename T>
T Get(const json& object, const char* key) {
  return object.at(key).get<T>();
}

}  // namespace

DatasetInfo DescribeDataset(const data::ImageSet& images,
                            absl::Span<const int64_t> sample_ids) {
  DatasetInfo info;
  info.num_samples = images.size();
  info.channels = images.channels;
  info.height = images.height;
  info.width = images.width;
  Sha256 hash;
  hash.Update(images.pixels.data(), images.pixels.size() * sizeof(float));
  hash.Update(images.labels.data(), images.labels.size() * sizeof(int32_t));
  hash.Update(sample_ids.data(), sample_ids.size() * sizeof(int64_t));
  info.sha256 = hash.HexDigest();
  return info;
}

std::string RunIdentityDigest(const RunManifest& manifest) {
  return Sha256Hex(IdentityJson(manifest).dump());
}

absl::Status ValidateTrainConfig(const TrainConfig& c) {
  auto bad = [](absl::string_view field, auto value, absl::string_view want) {
    return absl::InvalidArgumentError(
        absl::StrCat("training config: ", field, " is ", value, "; ", want));
  };
  if (c.batch_size < 1) return bad("batch_size", c.batch_size, "must be >= 1");
  if (c.steps < 1) return bad("steps", c.steps, "must be >= 1");
  if (c.steps > (int64_t{1} << 31)) {
    return bad("steps", c.steps, "must be below 2^31 (RNG counter word)");
  }
  if (c.checkpoint_every < 1) {
    return bad("checkpoint_every", c.checkpoint_every, "must be >= 1");
  }
  if (!(c.learning_rate > 0) || !std::isfinite(c.learning_rate)) {
    return bad("learning_rate", c.learning_rate, "must be a positive number");
  }
  if (c.num_timesteps < 2) {
    return bad("num_timesteps", c.num_timesteps, "must be >= 2");
  }
  if (c.model.base_channels < 2) {
    return bad("base_channels", c.model.base_channels, "must be >= 2");
  }
  return absl::OkStatus();
}

std::vector<int64_t> CheckpointSteps(int64_t steps, int64_t checkpoint_every) {
  std::vector<int64_t> out;
  if (checkpoint_every < 1) return out;
  for (int64_t s = checkpoint_every; s <= steps; s += checkpoint_every) {
    out.push_back(s);
  }
  if (steps >= 1 && (out.empty() || out.back() != steps)) out.push_back(steps);
  return out;
}

std::string CheckpointFileName(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "ckpt-%06" PRId64 ".pt", step);
  return name;
}

double CheckpointWeight(const TrainConfig& config, int64_t step) {
  const int64_t previous =
      ((step - 1) / config.checkpoint_every) * config.checkpoint_every;
  return config.learning_rate * static_cast<double>(step - previous);
}

std::string FormatRunJson(const RunManifest& m) {
  json checkpoints = json::array();
  for (const CheckpointInfo& c : m.checkpoints) {
    checkpoints.push_back({{"file", c.file},
                           {"step", c.step},
                           {"sha256", c.sha256},
                           {"weight", c.weight}});
  }
  json out = {{"format", kRunFormat},
              {"version", kRunFormatVersion},
              {"config", IdentityJson(m)},
              {"threads", m.threads},
              {"steps_done", m.steps_done},
              {"complete", m.complete},
              {"checkpoints", std::move(checkpoints)},
              {"loss_log", kLossLogFile}};
  if (!m.replay_sha256.empty()) {
    out["replay"] = {{"file", model::kReplayLogFile},
                     {"sha256", m.replay_sha256}};
  }
  return out.dump(2) + "\n";
}

absl::StatusOr<RunManifest> ParseRunJson(absl::string_view text,
                                         absl::string_view name) {
  json root = json::parse(text.begin(), text.end(), nullptr,
                          /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::DataLossError(absl::StrCat(name, " is not valid JSON"));
  }
  if (root.value("format", "") != kRunFormat) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " is not a retrace training run (format is not \"",
                     kRunFormat, "\")"));
  }
  if (root.value("version", 0) != kRunFormatVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unsupported version ", root.value("version", 0)));
  }
  RunManifest m;
  try {
    const json& config = root.at("config");
    const json& dataset = config.at("dataset");
    const json& model_json = config.at("model");
    TrainConfig& c = m.config;
    c.dataset_spec = Get<std::string>(dataset, "spec");
    c.dataset_seed = Get<uint64_t>(dataset, "seed");
    m.dataset.num_samples = Get<int64_t>(dataset, "num_samples");
    m.dataset.channels = Get<int64_t>(dataset, "channels");
    m.dataset.height = Get<int64_t>(dataset, "height");
    m.dataset.width = Get<int64_t>(dataset, "width");
    m.dataset.sha256 = Get<std::string>(dataset, "sha256");
    c.model.base_channels = Get<int64_t>(model_json, "base_channels");
    c.model.channel_mults =
        Get<std::vector<int64_t>>(model_json, "channel_mults");
    c.model.attention = Get<bool>(model_json, "attention");
    c.model.norm_groups = Get<int64_t>(model_json, "norm_groups");
    m.parameter_count = Get<int64_t>(model_json, "parameter_count");
    absl::StatusOr<model::ScheduleType> schedule = model::ParseScheduleType(
        Get<std::string>(config.at("schedule"), "type"));
    if (!schedule.ok()) return schedule.status();
    c.schedule = *schedule;
    c.num_timesteps = Get<int>(config.at("schedule"), "num_timesteps");
    absl::StatusOr<model::LossType> loss =
        model::ParseLossType(Get<std::string>(config, "loss"));
    if (!loss.ok()) return loss.status();
    c.loss = *loss;
    c.learning_rate = Get<double>(config.at("optimizer"), "lr");
    c.batch_size = Get<int64_t>(config, "batch_size");
    c.steps = Get<int64_t>(config, "steps");
    c.checkpoint_every = Get<int64_t>(config, "checkpoint_every");
    c.run_seed = Get<uint64_t>(config, "run_seed");
    m.threads = Get<int>(root, "threads");
    m.steps_done = Get<int64_t>(root, "steps_done");
    m.complete = Get<bool>(root, "complete");
    for (const json& entry : root.at("checkpoints")) {
      m.checkpoints.push_back(CheckpointInfo{
          Get<std::string>(entry, "file"), Get<int64_t>(entry, "step"),
          Get<std::string>(entry, "sha256"), Get<double>(entry, "weight")});
    }
    if (root.contains("replay")) {
      m.replay_sha256 = Get<std::string>(root.at("replay"), "sha256");
    }
  } catch (const json::exception& e) {
    return absl::DataLossError(
        absl::StrCat(name, ": missing or malformed field: ", e.what()));
  }
  return m;
}

absl::Status CheckSameRun(const RunManifest& existing,
                          const RunManifest& wanted,
                          absl::string_view run_dir) {
  const json before = IdentityJson(existing);
  const json after = IdentityJson(wanted);
  if (before == after) return absl::OkStatus();
  std::string detail = "the configuration differs";
  const json patch = json::diff(before, after);
  if (!patch.empty()) {
    const std::string path = patch[0].value("path", "");
    const json::json_pointer pointer(path);
    const std::string old_value =
        before.contains(pointer) ? before.at(pointer).dump() : "(absent)";
    const std::string new_value =
        after.contains(pointer) ? after.at(pointer).dump() : "(absent)";
    detail = absl::StrCat("config", path, " is ", old_value, " there but ",
                          new_value, " now");
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "run directory ", run_dir, " holds a different training run (", detail,
      "); choose another --run-dir or remove it"));
}

std::string FormatLossLog(absl::Span<const float> losses) {
  std::string out = "step,loss\n";
  char line[64];
  for (size_t s = 0; s < losses.size(); ++s) {
    std::snprintf(line, sizeof(line), "%zu,%.9g\n", s,
                  static_cast<double>(losses[s]));
    out += line;
  }
  return out;
}

absl::StatusOr<std::vector<float>> ParseLossLog(absl::string_view text,
                                                absl::string_view name) {
  std::vector<float> losses;
  int64_t line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    ++line_number;
    if (line_number == 1) {
      if (line != "step,loss") {
        return absl::DataLossError(
            absl::StrCat(name, ": line 1 is not the header \"step,loss\""));
      }
      continue;
    }
    std::pair<absl::string_view, absl::string_view> fields =
        absl::StrSplit(line, absl::MaxSplits(',', 1));
    int64_t step = 0;
    float loss = 0;
    if (!absl::SimpleAtoi(fields.first, &step) ||
        !absl::SimpleAtof(fields.second, &loss) ||
        step != static_cast<int64_t>(losses.size())) {
      return absl::DataLossError(absl::StrCat(name, ": line ", line_number,
                                              " is malformed: \"", line, "\""));
    }
    losses.push_back(loss);
  }
  if (line_number == 0) {
    return absl::DataLossError(absl::StrCat(name, " is empty"));
  }
  return losses;
}

absl::StatusOr<RunManifest> LoadRun(const std::string& run_dir,
                                    bool verify_checksums, Env* env) {
  const std::string path = absl::StrCat(run_dir, "/", kRunJsonFile);
  absl::StatusOr<std::string> text = env->ReadFile(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<RunManifest> manifest = ParseRunJson(*text, path);
  if (!manifest.ok() || !verify_checksums) return manifest;
  auto verify = [&](const std::string& file,
                    const std::string& expected) -> absl::Status {
    const std::string file_path = absl::StrCat(run_dir, "/", file);
    absl::StatusOr<std::string> digest = Sha256File(file_path);
    if (!digest.ok()) return digest.status();
    if (*digest != expected) {
      return absl::DataLossError(absl::StrCat(file_path, ": sha256 ", *digest,
                                              " differs from ", expected,
                                              " recorded in ", path));
    }
    return absl::OkStatus();
  };
  for (const CheckpointInfo& c : manifest->checkpoints) {
    absl::Status ok = verify(c.file, c.sha256);
    if (!ok.ok()) return ok;
  }
  if (!manifest->replay_sha256.empty()) {
    absl::Status ok = verify(model::kReplayLogFile, manifest->replay_sha256);
    if (!ok.ok()) return ok;
  }
  return manifest;
}

run::ModelDescription DescribeRunModel(const RunManifest& manifest) {
  const TrainConfig& config = manifest.config;
  run::ModelDescription d;
  d.kind = run::ModelKind::kBuiltinUNet;
  d.unet.base_channels = config.model.base_channels;
  d.unet.channel_mults = config.model.channel_mults;
  d.unet.attention = config.model.attention;
  d.unet.norm_groups = config.model.norm_groups;
  d.unet.image_channels = manifest.dataset.channels;
  d.unet.image_size = manifest.dataset.height;
  d.image.channels = manifest.dataset.channels;
  d.image.height = manifest.dataset.height;
  d.image.width = manifest.dataset.width;
  d.schedule.type = std::string(model::ScheduleTypeName(config.schedule));
  d.schedule.timesteps = config.num_timesteps;
  d.loss = std::string(model::LossTypeName(config.loss));
  for (const CheckpointInfo& c : manifest.checkpoints) {
    d.checkpoints.push_back({c.file, c.weight, c.sha256, c.step});
  }
  d.data.source = "mixture";
  d.data.spec = config.dataset_spec;
  d.data.seed = config.dataset_seed;
  d.data.sha256 = manifest.dataset.sha256;
  d.training_run = ".";
  return d;
}

}  // namespace retrace::jobs

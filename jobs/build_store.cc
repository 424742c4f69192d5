// The store build: run directory + training set -> store (build_store.h).
#include "jobs/build_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "jobs/progress.h"
#include "jobs/run_dir.h"
#include "jobs/train.h"
#include "nlohmann/json.hpp"
#include "common/file_util.h"
#include "common/status.h"
#include "server/featurize/featurizer.h"
#include "server/featurize/timesteps.h"
#include "server/model/device.h"
#include "server/model/diffusion_model.h"
#include "server/model/replay.h"
#include "server/model/schedule.h"
#include "server/model/torch_status.h"
#include "server/model/unet.h"
#include "server/run/model_description.h"
#include "server/store/layout.h"
#include "server/store/safetensors.h"
#include "server/store/store_parts.h"
#include "server/store/store_writer.h"

namespace retrace::jobs {
namespace {

using json = nlohmann::json;
using model::internal::CallTorch;

constexpr char kPartsSpecFormat[] = "retrace-store-build-spec";

// ---- Progress --------------------------------------------------------------

// Samples done / total with samples/s and ETA: a bar redrawn in place on a
// terminal, a plain line every `interval_s` otherwise.
class SampleProgress {
 public:
  using Clock = std::chrono::steady_clock;

  SampleProgress(std::FILE* out, bool is_tty, int64_t start, int64_t total,
                 double interval_s)
      : out_(out),
        is_tty_(is_tty),
        start_(start),
        total_(total),
        done_(start),
        interval_s_(interval_s),
        started_(Clock::now()),
        last_print_(started_) {}

  void Update(int64_t done) {
    done_ = done;
    if (out_ == nullptr) return;
    const double since = Seconds(last_print_, Clock::now());
    if (since >= (is_tty_ ? 0.1 : interval_s_)) Print(false);
  }

  // The final line, unless the last line printed already showed it.
  void Finish() {
    if (out_ != nullptr && done_ > start_ && (is_tty_ || printed_ != done_)) {
      Print(true);
    }
  }

  double rate() const {
    const double elapsed = Seconds(started_, Clock::now());
    return elapsed > 0 ? static_cast<double>(done_ - start_) / elapsed : 0;
  }

 private:
  static double Seconds(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }

  void Print(bool final_line) {
    last_print_ = Clock::now();
    printed_ = done_;
    constexpr int kBarWidth = 24;
    std::string bar;
    if (is_tty_) {
      const int filled =
          total_ > 0 ? static_cast<int>(kBarWidth * done_ / total_) : kBarWidth;
      bar = absl::StrCat("[", std::string(filled, '#'),
                         std::string(kBarWidth - filled, '.'), "] ");
    }
    const double r = rate();
    const std::string rate_text =
        r > 0 ? absl::StrFormat("%.2f samples/s ETA %s", r,
                                FormatDuration((total_ - done_) / r))
              : std::string("-- samples/s ETA --");
    std::fprintf(out_, "%s%s%lld/%lld samples %s%s", is_tty_ ? "\r" : "",
                 bar.c_str(), static_cast<long long>(done_),
                 static_cast<long long>(total_), rate_text.c_str(),
                 is_tty_ && !final_line ? "" : "\n");
    std::fflush(out_);
  }

  std::FILE* out_;
  bool is_tty_;
  int64_t start_;
  int64_t total_;
  int64_t done_;
  double interval_s_;
  int64_t printed_ = -1;  // done_ when the last line was printed
  Clock::time_point started_;
  Clock::time_point last_print_;
};

// ---- Spec ------------------------------------------------------------------

absl::Status ValidateInputs(const StoreBuildConfig& config,
                            const data::ImageSet& images,
                            absl::Span<const int64_t> sample_ids,
                            const StoreBuildOptions& options) {
  if (options.model_path.empty()) {
    return absl::InvalidArgumentError(
        "build-store: no model description given");
  }
  if (options.out_dir.empty()) {
    return absl::InvalidArgumentError("build-store: no output directory given");
  }
  if (config.grad_timesteps < 1 ||
      config.grad_timesteps >= featurize::kMaxDrawIndex) {
    return absl::InvalidArgumentError(absl::StrCat(
        "build-store: grad_timesteps must be in [1, ",
        featurize::kMaxDrawIndex - 1, "], got ", config.grad_timesteps));
  }
  if (config.bucket_edges.empty() &&
      (config.num_buckets < 1 ||
       config.num_buckets >= featurize::kMaxBuckets)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "build-store: buckets must be >= 1, got ", config.num_buckets));
  }
  if (config.samples_per_shard < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("build-store: samples_per_shard must be >= 1, got ",
                     config.samples_per_shard));
  }
  if (options.batch_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "build-store: batch rows must be >= 1, got ", options.batch_rows));
  }
  if (options.num_parts < 0 ||
      (options.num_parts > 0 &&
       (options.part_index < 0 || options.part_index >= options.num_parts))) {
    return absl::InvalidArgumentError(
        absl::StrCat("build-store: shard ", options.part_index, "/",
                     options.num_parts, " must satisfy 0 <= i < n"));
  }
  if (images.size() < 1 || static_cast<int64_t>(images.pixels.size()) !=
                               images.size() * images.image_numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "build-store: the training set must hold size()·C·H·W pixels; got ",
        images.size(), " images and ", images.pixels.size(), " values"));
  }
  if (!sample_ids.empty() &&
      static_cast<int64_t>(sample_ids.size()) != images.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("build-store: ", sample_ids.size(), " sample ids for ",
                     images.size(), " images"));
  }
  return absl::OkStatus();
}

// Checks that the replay log belongs to this run and this data.
absl::Status CheckReplayLog(const model::ReplayLog& log, const RunManifest& run,
                            const std::vector<int64_t>& sample_ids,
                            const std::string& where) {
  std::vector<int64_t> steps;
  for (const CheckpointInfo& c : run.checkpoints) steps.push_back(c.step);
  auto mismatch = [&](absl::string_view field, const std::string& logged,
                      const std::string& expected) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, ": ", field, " is ", logged, " but the run has ", expected));
  };
  if (log.run_seed() != run.config.run_seed) {
    return mismatch("run_seed", absl::StrCat(log.run_seed()),
                    absl::StrCat(run.config.run_seed));
  }
  if (log.num_timesteps() != run.config.num_timesteps) {
    return mismatch("num_timesteps", absl::StrCat(log.num_timesteps()),
                    absl::StrCat(run.config.num_timesteps));
  }
  if (log.checkpoint_steps() != steps) {
    return mismatch("the checkpoint list",
                    absl::StrCat(log.num_checkpoints(), " checkpoints"),
                    absl::StrCat(steps.size(), " checkpoints at other steps"));
  }
  if (log.sample_ids() != sample_ids) {
    return mismatch("the sample id list",
                    absl::StrCat(log.num_samples(), " samples"),
                    "other sample ids (is the dataset the run's?)");
  }
  return absl::OkStatus();
}

// dataset.* of the manifest: descriptive fields plus the seeds that the
// training-side draws depend on. store_seed lives here because StoreSpec has
// no field of its own for it; being part of the spec, it keeps a resume from
// mixing two seeds.
json DatasetJson(const StoreBuildConfig& config,
                 const StoreBuildOptions& options, const RunManifest* run,
                 const DatasetInfo& info, const data::ImageSet& images,
                 bool replay) {
  json d = json::object();
  d["name"] = options.dataset_name.empty() ? images.name : options.dataset_name;
  d["seed"] = options.dataset_seed;
  // Recorded only when off, so that stores of shuffled mixtures keep their
  // bytes (and ids) from before the field existed.
  if (!options.dataset_shuffle) d["shuffle"] = false;
  d["sha256"] = info.sha256;
  d["num_samples"] = info.num_samples;
  if (!options.dataset_root.empty()) d["root"] = options.dataset_root;
  d["store_seed"] = config.store_seed;
  if (run != nullptr) d["run_seed"] = run->config.run_seed;
  if (replay) d["replay_sha256"] = run->replay_sha256;
  return d;
}

// ---- Diagnostics -----------------------------------------------------------

// Ranks 1..n of `values`, ties sharing their average rank.
std::vector<double> AverageRanks(const std::vector<double>& values) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return values[a] < values[b]; });
  std::vector<double> ranks(values.size());
  size_t i = 0;
  while (i < order.size()) {
    size_t j = i;
    while (j + 1 < order.size() && values[order[j + 1]] == values[order[i]]) {
      ++j;
    }
    const double rank = 0.5 * static_cast<double>(i + j) + 1.0;
    for (size_t k = i; k <= j; ++k) ranks[order[k]] = rank;
    i = j + 1;
  }
  return ranks;
}

// Pearson correlation of the ranks; null when undefined (fewer than two
// pairs, or one side constant).
json Spearman(const std::vector<double>& x, const std::vector<double>& y) {
  if (x.size() < 2) return nullptr;
  const std::vector<double> rx = AverageRanks(x);
  const std::vector<double> ry = AverageRanks(y);
  const double n = static_cast<double>(x.size());
  double mx = 0, my = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    mx += rx[i];
    my += ry[i];
  }
  mx /= n;
  my /= n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    sxy += (rx[i] - mx) * (ry[i] - my);
    sxx += (rx[i] - mx) * (rx[i] - mx);
    syy += (ry[i] - my) * (ry[i] - my);
  }
  if (sxx <= 0 || syy <= 0) return nullptr;
  return sxy / std::sqrt(sxx * syy);
}

// The job's diagnostics (docs/store-build.md): per checkpoint the Spearman
// correlation between the sampled timestep (mean of the m draws) and ‖g‖ over
// all (sample, bucket) pairs, and per (checkpoint, bucket) the range of the
// sampled timesteps. The timesteps are regenerated from their keys, so a join
// computes exactly what a whole build does. norms: [N][C][S].
json BuildDiagnostics(const store::StoreSpec& spec, uint64_t store_seed,
                      const std::vector<float>& norms, int64_t num_samples) {
  const int64_t num_c = spec.num_checkpoints();
  const int64_t num_b = spec.num_buckets();
  const int64_t num_s = spec.num_slots();
  const int64_t m = spec.grad_timesteps;
  const std::vector<int64_t>& edges = spec.buckets.edges;
  json spearman = json::array();
  json ranges = json::array();
  for (int64_t c = 0; c < num_c; ++c) {
    std::vector<double> t(static_cast<size_t>(num_samples * num_b));
    std::vector<double> g(t.size());
    std::vector<double> lo(num_b, INFINITY), hi(num_b, -INFINITY);
    for (int64_t n = 0; n < num_samples; ++n) {
      for (int64_t b = 0; b < num_b; ++b) {
        double sum = 0;
        for (int64_t j = 0; j < m; ++j) {
          sum += static_cast<double>(featurize::BuildTimestep(
              store_seed, n, c, b, j, edges[b], edges[b + 1]));
        }
        const double mean = sum / static_cast<double>(m);
        const size_t k = static_cast<size_t>(n * num_b + b);
        t[k] = mean;
        g[k] = norms[static_cast<size_t>((n * num_c + c) * num_s + b)];
        lo[b] = std::min(lo[b], mean);
        hi[b] = std::max(hi[b], mean);
      }
    }
    spearman.push_back(Spearman(t, g));
    json per_bucket = json::array();
    for (int64_t b = 0; b < num_b; ++b) {
      per_bucket.push_back(num_samples > 0 ? json::array({lo[b], hi[b]})
                                           : json(nullptr));
    }
    ranges.push_back(std::move(per_bucket));
  }
  return json{{"spearman", std::move(spearman)},
              {"spearman_pairs", num_samples * num_b},
              {"sampled_timestep_range", std::move(ranges)}};
}

// Appends the `norms` tensor of shard `index` (samples_per_shard·C·S floats,
// or fewer for the last) to `out`.
absl::Status ReadShardNorms(Env* env, const std::string& dir, int64_t index,
                            int64_t expected_count, int64_t values_per_sample,
                            std::vector<float>* out) {
  const std::string path = absl::StrCat(dir, "/", store::ShardFileName(index));
  ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map, env->MapFile(path));
  ASSIGN_OR_RETURN(
      store::SafetensorsHeader header,
      store::ParseSafetensorsHeader(map->data(), map->size(), path));
  const store::TensorEntry* norms = header.Find(store::kNormsTensor);
  const int64_t values = expected_count * values_per_sample;
  if (norms == nullptr || norms->dtype != "F32" ||
      norms->end - norms->begin != values * 4) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": tensor 'norms' missing or not F32 with ", values, " values"));
  }
  const size_t old = out->size();
  out->resize(old + static_cast<size_t>(values));
  std::memcpy(out->data() + old, map->data() + header.data_start + norms->begin,
              static_cast<size_t>(values) * 4);
  return absl::OkStatus();
}

// ---- Self-influence --------------------------------------------------------

// Self-influence (docs/store-build.md) from one sample's fp32 unit vectors
// [C][S][D] and norms [C][S], in double: with a replay slot
// Σ_c w_c ⟨v_R, (1/B) Σ_b v_b⟩, else Σ_c w_c ‖(1/B) Σ_b v_b‖², where
// v = ‖g‖·u (TracIn) or u (ReTrac).
std::pair<float, float> SelfInfluence(const float* unit, const float* norms,
                                      const std::vector<double>& weights,
                                      int64_t num_b, bool replay, int64_t dim) {
  const int64_t num_s = num_b + (replay ? 1 : 0);
  double tracin = 0, retrac = 0;
  std::vector<double> mean_t(dim), mean_r(dim);
  for (size_t c = 0; c < weights.size(); ++c) {
    std::fill(mean_t.begin(), mean_t.end(), 0.0);
    std::fill(mean_r.begin(), mean_r.end(), 0.0);
    const float* u_c = unit + c * num_s * dim;
    const float* g_c = norms + c * num_s;
    for (int64_t b = 0; b < num_b; ++b) {
      const double g = g_c[b];
      for (int64_t d = 0; d < dim; ++d) {
        mean_t[d] += g * u_c[b * dim + d];
        mean_r[d] += u_c[b * dim + d];
      }
    }
    double dot_t = 0, dot_r = 0;
    for (int64_t d = 0; d < dim; ++d) {
      mean_t[d] /= static_cast<double>(num_b);
      mean_r[d] /= static_cast<double>(num_b);
      if (replay) {
        const double u = u_c[num_b * dim + d];
        dot_t += static_cast<double>(g_c[num_b]) * u * mean_t[d];
        dot_r += u * mean_r[d];
      } else {
        dot_t += mean_t[d] * mean_t[d];
        dot_r += mean_r[d] * mean_r[d];
      }
    }
    tracin += weights[c] * dot_t;
    retrac += weights[c] * dot_r;
  }
  return {static_cast<float>(tracin), static_cast<float>(retrac)};
}

// ---- Parts spec file -------------------------------------------------------

absl::StatusOr<std::string> PartsSpecText(const store::StoreSpec& spec,
                                          int64_t total_samples) {
  json j = json::object();
  json spec_json = json::object();
  spec.ToJson(&spec_json);
  ASSIGN_OR_RETURN(std::string sha, spec.Sha256());
  j["format"] = kPartsSpecFormat;
  j["num_samples"] = total_samples;
  j["spec"] = std::move(spec_json);
  j["spec_sha256"] = sha;
  return j.dump(2) + "\n";
}

// Writes kPartsSpecFile, or checks that the one already there (from another
// part of the same build) is identical. Parts may run side by side in one
// directory, so each writes through a temporary name of its own; JoinStore
// removes any such temporary a killed part left.
absl::Status WritePartsSpec(Env* env, const std::string& dir,
                            int64_t part_index, const std::string& text) {
  const std::string path = absl::StrCat(dir, "/", kPartsSpecFile);
  absl::StatusOr<std::string> existing = env->ReadFile(path);
  if (existing.ok()) {
    if (*existing == text) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        path,
        " describes another build (different spec or dataset size); "
        "use another output directory or remove the old build"));
  }
  if (!absl::IsNotFound(existing.status())) return existing.status();
  const std::string temp = absl::StrCat(path, ".", part_index, kTempSuffix);
  {
    ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> out,
                     env->NewWritableFile(temp));
    RETURN_IF_ERROR(out->Append(text));
    RETURN_IF_ERROR(out->Close());
  }
  return CommitFile(env, temp, path);
}

// kPartsSpecFile and the temporaries WritePartsSpec may have left.
bool IsPartsSpecFile(const std::string& name) {
  return name == kPartsSpecFile ||
         (absl::StartsWith(name, absl::StrCat(kPartsSpecFile, ".")) &&
          absl::EndsWith(name, kTempSuffix));
}

// ---- The build -------------------------------------------------------------

// One checkpoint's model and featurizer; the featurizer borrows the model.
struct LoadedCheckpoint {
  std::unique_ptr<model::DiffusionModel> net;
  std::unique_ptr<featurize::Featurizer> featurizer;
};

// The append target: a whole-store writer or one part's writer.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual int64_t next_sample() const = 0;
  virtual absl::Status Append(const store::SampleRecord& record) = 0;
};

class WholeSink : public Sink {
 public:
  explicit WholeSink(store::StoreWriter* w) : w_(w) {}
  int64_t next_sample() const override { return w_->next_sample(); }
  absl::Status Append(const store::SampleRecord& r) override {
    return w_->Append(r);
  }

 private:
  store::StoreWriter* w_;
};

class PartSink : public Sink {
 public:
  explicit PartSink(store::StorePartWriter* w) : w_(w) {}
  int64_t next_sample() const override { return w_->next_sample(); }
  absl::Status Append(const store::SampleRecord& r) override {
    return w_->Append(r);
  }

 private:
  store::StorePartWriter* w_;
};

}  // namespace

absl::StatusOr<StoreBuildResult> BuildStore(
    const StoreBuildConfig& config, const data::ImageSet& images,
    absl::Span<const int64_t> sample_ids_in, const StoreBuildOptions& options) {
  RETURN_IF_ERROR(ValidateInputs(config, images, sample_ids_in, options));
  ASSIGN_OR_RETURN(const model::DeviceChoice device,
                   model::ResolveDevice(options.device));
  if (options.threads > 0) at::set_num_threads(options.threads);

  // The model description: every checkpoint hashed against it (and, for a
  // retrace-batch train run, against run.json) before anything is loaded.
  ASSIGN_OR_RETURN(const run::ModelDescription description,
                   run::LoadModelDescription(options.model_path,
                                             /*verify_checksums=*/true));
  const std::string& where = description.source;
  if (static_cast<int64_t>(description.checkpoints.size()) >=
      featurize::kMaxCheckpoints) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": too many checkpoints"));
  }
  if (images.channels != description.image.channels ||
      images.height != description.image.height ||
      images.width != description.image.width) {
    return absl::InvalidArgumentError(
        absl::StrCat("build-store: the training images are ", images.channels,
                     "x", images.height, "x", images.width, " but ", where,
                     " field 'image' says ", description.image.channels, "x",
                     description.image.height, "x", description.image.width));
  }
  std::optional<RunManifest> run;
  std::string run_dir;
  if (!description.training_run.empty()) {
    run_dir = description.Resolve(description.training_run);
    ASSIGN_OR_RETURN(run,
                     LoadRun(run_dir, /*verify_checksums=*/true, options.env));
    if (!run->complete || run->checkpoints.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          run_dir, ": the training run is unfinished (", run->steps_done,
          " of ", run->config.steps,
          " steps); finish it with retrace-batch train --resume first"));
    }
  }

  // The data must be what the model trained on, sample for sample, where the
  // description (or the run) records its fingerprint.
  std::vector<int64_t> sample_ids(sample_ids_in.begin(), sample_ids_in.end());
  if (sample_ids.empty()) {
    for (int64_t n = 0; n < images.size(); ++n) sample_ids.push_back(n);
  }
  const DatasetInfo info = DescribeDataset(images, sample_ids);
  const std::string expected_sha256 =
      run ? run->dataset.sha256 : description.data.sha256;
  if (!expected_sha256.empty() && info.sha256 != expected_sha256) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the dataset does not match the training data of ", where, ": ",
        info.num_samples, " samples of ", info.channels, "×", info.height, "×",
        info.width, " with fingerprint ", info.sha256,
        ", but the model trained on data with fingerprint ", expected_sha256,
        run ? absl::StrCat(" (", run->dataset.num_samples,
                           " samples, dataset \"", run->config.dataset_spec,
                           "\", seed ", run->config.dataset_seed, ")")
            : std::string()));
  }
  const int64_t total = images.size();

  // Replay slot: only a retrace-batch train run logs one.
  const bool run_has_replay = run && !run->replay_sha256.empty();
  if (config.replay == ReplayMode::kOn && !run_has_replay) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, ": the model has no replay log (", model::kReplayLogFile,
        " of a retrace-batch train run); build without --replay"));
  }
  const bool replay = config.replay == ReplayMode::kOn ||
                      (config.replay == ReplayMode::kAuto && run_has_replay);
  model::ReplayLog replay_log;
  if (replay) {
    ASSIGN_OR_RETURN(replay_log, model::ReplayLog::Load(run_dir));
    RETURN_IF_ERROR(
        CheckReplayLog(replay_log, *run, sample_ids,
                       absl::StrCat(run_dir, "/", model::kReplayLogFile)));
  }

  // Models and featurizers, one per checkpoint, all kept loaded: every chunk
  // visits every checkpoint and reloading would cost more than the memory.
  ASSIGN_OR_RETURN(const model::NoiseSchedule schedule,
                   run::CreateNoiseSchedule(description.schedule));
  const int64_t num_timesteps = description.schedule.timesteps;
  featurize::FeaturizeSpec fspec;
  if (!config.bucket_edges.empty()) {
    fspec.bucket_edges = config.bucket_edges;
  } else {
    if (config.num_buckets > num_timesteps) {
      return absl::InvalidArgumentError(
          absl::StrCat("build-store: ", config.num_buckets,
                       " buckets for T = ", num_timesteps, " timesteps"));
    }
    fspec.bucket_edges =
        featurize::EqualBucketEdges(config.num_buckets, num_timesteps);
  }
  RETURN_IF_ERROR(
      featurize::ValidateBucketEdges(fspec.bucket_edges, num_timesteps));
  fspec.grad_timesteps = config.grad_timesteps;
  fspec.store_seed = config.store_seed;
  fspec.projection.type = config.projection;
  fspec.projection.output_dim = config.dim;
  fspec.projection.sparsity = config.sparsity;
  fspec.projection.seed = config.projection_seed;
  fspec.param_regex = config.param_regex;
  ASSIGN_OR_RETURN(fspec.loss, run::LossTypeOf(description));
  featurize::FeaturizeOptions fopts;
  fopts.max_rows = options.batch_rows;

  std::vector<LoadedCheckpoint> checkpoints;
  for (size_t c = 0; c < description.checkpoints.size(); ++c) {
    LoadedCheckpoint loaded;
    ASSIGN_OR_RETURN(loaded.net,
                     run::LoadCheckpointModel(description, int64_t(c)));
    RETURN_IF_ERROR(model::MoveModelTo(*loaded.net, device));
    ASSIGN_OR_RETURN(loaded.featurizer,
                     featurize::Featurizer::Create(loaded.net.get(), schedule,
                                                   fspec, fopts));
    checkpoints.push_back(std::move(loaded));
  }
  const featurize::Featurizer& first = *checkpoints.front().featurizer;
  const std::vector<int64_t> edges = first.spec().bucket_edges;
  const int64_t num_c = static_cast<int64_t>(checkpoints.size());
  const int64_t num_b = first.num_buckets();
  const int64_t num_s = num_b + (replay ? 1 : 0);
  const int64_t dim = config.dim;
  const int64_t m = config.grad_timesteps;

  // The store spec.
  store::StoreSpec spec;
  run::RecordInStoreSpec(description, &spec);
  std::vector<double> weights;
  for (const run::CheckpointDescription& c : description.checkpoints) {
    weights.push_back(c.weight);
  }
  spec.buckets.edges = edges;
  spec.buckets.replay = replay;
  spec.projection.type = config.projection;
  spec.projection.dim = dim;
  spec.projection.sparsity = config.sparsity;
  spec.projection.seed = config.projection_seed;
  spec.projection.param_regex = config.param_regex;
  spec.projection.input_dim = first.input_dim();
  spec.grad_timesteps = m;
  spec.dtype = config.dtype;
  spec.samples_per_shard = config.samples_per_shard;
  spec.dataset =
      DatasetJson(config, options, run ? &*run : nullptr, info, images, replay);
  RETURN_IF_ERROR(spec.Validate());

  // The writer (resuming what is on disk) and this build's sample range.
  std::unique_ptr<store::StoreWriter> whole;
  std::unique_ptr<store::StorePartWriter> part;
  std::unique_ptr<Sink> sink;
  StoreBuildResult result;
  result.total_samples = total;
  result.input_dim = first.input_dim();
  if (options.num_parts == 0) {
    ASSIGN_OR_RETURN(
        whole, store::StoreWriter::Create(options.out_dir, spec, options.env));
    sink = std::make_unique<WholeSink>(whole.get());
    result.first_sample = 0;
    result.end_sample = total;
  } else {
    ASSIGN_OR_RETURN(part, store::StorePartWriter::Create(
                               options.out_dir, spec, options.part_index,
                               options.num_parts, total, options.env));
    ASSIGN_OR_RETURN(const std::string spec_text, PartsSpecText(spec, total));
    RETURN_IF_ERROR(WritePartsSpec(options.env, options.out_dir,
                                   options.part_index, spec_text));
    sink = std::make_unique<PartSink>(part.get());
    result.first_sample = part->range().first_sample;
    result.end_sample = part->range().end_sample;
  }
  const int64_t start = sink->next_sample();
  if (start > result.end_sample) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.out_dir, " holds ", start,
                     " samples of a build with this spec but the dataset has ",
                     result.end_sample, "; remove it to rebuild"));
  }
  result.resumed_samples = start - result.first_sample;

  // Norms of the whole store for the diagnostics: resumed shards read back,
  // the rest as computed.
  std::vector<float> all_norms;
  if (whole != nullptr) {
    all_norms.reserve(static_cast<size_t>(total * num_c * num_s));
    for (int64_t shard = 0; shard * config.samples_per_shard < start; ++shard) {
      RETURN_IF_ERROR(ReadShardNorms(options.env, options.out_dir, shard,
                                     config.samples_per_shard, num_c * num_s,
                                     &all_norms));
    }
  }

  const model::ImageShape shape{images.channels, images.height, images.width};
  const std::vector<int64_t> draw_shape = {images.channels, images.height,
                                           images.width};
  const int64_t numel = images.image_numel();
  const int64_t chunk = std::max<int64_t>(1, options.batch_rows / m);
  const int64_t k = config.samples_per_shard;
  SampleProgress progress(options.progress_out, options.progress_is_tty,
                          start - result.first_sample,
                          result.end_sample - result.first_sample,
                          options.progress_interval_s);
  const auto started = std::chrono::steady_clock::now();
  std::vector<float> vectors(static_cast<size_t>(num_c * num_s * dim));
  std::vector<float> norms(static_cast<size_t>(num_c * num_s));
  std::vector<int32_t> train_timesteps(replay ? num_c : 0);

  bool stopped = false;
  int64_t n0 = start;
  while (n0 < result.end_sample) {
    // The chunk grid: cut at multiples of `chunk` and of `k`, so that every
    // build of this spec passes the same samples together.
    const int64_t n1 = std::min(
        {result.end_sample, (n0 / chunk + 1) * chunk, (n0 / k + 1) * k});
    const int64_t count = n1 - n0;
    std::vector<featurize::TrainFeatures> features(num_c);
    std::vector<std::vector<int32_t>> logged_t(num_c);
    std::vector<std::vector<bool>> seen(num_c);
    RETURN_IF_ERROR(CallTorch("build-store", [&]() -> absl::Status {
      const at::Tensor x =
          at::from_blob(const_cast<float*>(images.pixels.data()) + n0 * numel,
                        {count, shape.channels, shape.height, shape.width},
                        at::kFloat)
              .clone();
      run::ToModelRange(description.image, x.data_ptr<float>(), x.numel());
      for (int64_t c = 0; c < num_c; ++c) {
        featurize::ReplayDraws draws;
        if (replay) {
          draws.timesteps = at::zeros({count}, at::kLong);
          draws.noise = at::zeros(
              {count, shape.channels, shape.height, shape.width}, at::kFloat);
          int64_t* t = draws.timesteps.data_ptr<int64_t>();
          float* eps = draws.noise.data_ptr<float>();
          logged_t[c].assign(count, 0);
          seen[c].assign(count, false);
          for (int64_t i = 0; i < count; ++i) {
            const model::ReplayRecord& record = replay_log.At(c, n0 + i);
            // A sample unseen before checkpoint c had no influence on θ_c:
            // its replay slot is stored as zero (see docs/store-build.md).
            // The featurizer still needs a draw; t = 0 with zero noise
            // is computed and discarded.
            if (!record.seen()) continue;
            ASSIGN_OR_RETURN(model::TrainDraw draw,
                             replay_log.Draw(c, n0 + i, draw_shape));
            if (draw.timestep != record.timestep) {
              return absl::DataLossError(absl::StrCat(
                  run_dir, "/", model::kReplayLogFile, ": logged timestep ",
                  record.timestep, " of sample ", n0 + i, " at checkpoint ", c,
                  " differs from the ", draw.timestep, " its keys give"));
            }
            t[i] = draw.timestep;
            std::memcpy(eps + i * numel, draw.noise.data(),
                        static_cast<size_t>(numel) * sizeof(float));
            logged_t[c][i] = record.timestep;
            seen[c][i] = true;
          }
        }
        ASSIGN_OR_RETURN(features[c], checkpoints[c].featurizer->TrainingSide(
                                          x, n0, c, replay ? &draws : nullptr));
        features[c].unit = features[c].unit.contiguous();
        features[c].norms = features[c].norms.contiguous();
      }
      return absl::OkStatus();
    }));

    for (int64_t i = 0; i < count; ++i) {
      for (int64_t c = 0; c < num_c; ++c) {
        const float* u = features[c].unit.data_ptr<float>() + i * num_s * dim;
        const float* g = features[c].norms.data_ptr<float>() + i * num_s;
        std::memcpy(vectors.data() + c * num_s * dim, u,
                    static_cast<size_t>(num_s * dim) * sizeof(float));
        std::memcpy(norms.data() + c * num_s, g,
                    static_cast<size_t>(num_s) * sizeof(float));
        if (replay) {
          train_timesteps[c] = logged_t[c][i];
          if (!seen[c][i]) {
            std::fill_n(vectors.data() + (c * num_s + num_b) * dim, dim, 0.0f);
            norms[c * num_s + num_b] = 0.0f;
          }
        }
      }
      const auto [si_tracin, si_retrac] = SelfInfluence(
          vectors.data(), norms.data(), weights, num_b, replay, dim);
      store::SampleRecord record;
      record.sample_id = sample_ids[n0 + i];
      record.label = images.labels[n0 + i];
      record.vectors = vectors;
      record.norms = norms;
      record.self_influence_tracin = si_tracin;
      record.self_influence_retrac = si_retrac;
      record.train_timesteps = train_timesteps;
      RETURN_IF_ERROR(sink->Append(record));
      if (whole != nullptr) {
        all_norms.insert(all_norms.end(), norms.begin(), norms.end());
      }
    }
    n0 = n1;
    result.built_samples += count;
    progress.Update(n0 - result.first_sample);
    if (options.should_stop && n0 < result.end_sample &&
        options.should_stop(n0 - result.first_sample)) {
      stopped = true;
      break;
    }
  }
  progress.Finish();
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count();
  result.samples_per_second =
      result.seconds > 0 ? result.built_samples / result.seconds : 0;
  if (stopped) return result;

  if (whole != nullptr) {
    const json diagnostics =
        BuildDiagnostics(spec, config.store_seed, all_norms, total);
    ASSIGN_OR_RETURN(result.manifest, whole->Finish(diagnostics));
  } else {
    ASSIGN_OR_RETURN(result.part, part->Finish());
  }
  result.complete = true;
  return result;
}

absl::StatusOr<store::Manifest> JoinStore(const std::string& dir, Env* env) {
  const std::string spec_path = absl::StrCat(dir, "/", kPartsSpecFile);
  ASSIGN_OR_RETURN(const std::string text, env->ReadFile(spec_path));
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("format", "") != kPartsSpecFormat ||
      !j.contains("spec") || !j.contains("num_samples") ||
      !j["num_samples"].is_number_integer()) {
    return absl::DataLossError(absl::StrCat(
        spec_path, ": not a build spec written by retrace-batch build-store"));
  }
  ASSIGN_OR_RETURN(const store::StoreSpec spec,
                   store::StoreSpec::FromJson(j["spec"], spec_path));
  const int64_t total = j["num_samples"].get<int64_t>();
  const json& dataset = spec.dataset;
  if (!dataset.contains("store_seed") ||
      !dataset["store_seed"].is_number_unsigned()) {
    return absl::DataLossError(
        absl::StrCat(spec_path, ": field 'spec.dataset.store_seed' missing"));
  }
  const uint64_t store_seed = dataset["store_seed"].get<uint64_t>();

  // Diagnostics from the shards' norms. A missing or damaged shard fails
  // here with its name; JoinStoreParts then verifies everything in full.
  const int64_t k = spec.samples_per_shard;
  const int64_t values = spec.num_checkpoints() * spec.num_slots();
  std::vector<float> norms;
  for (int64_t shard = 0; shard < store::NumShards(total, k); ++shard) {
    RETURN_IF_ERROR(ReadShardNorms(env, dir, shard,
                                   store::ShardSampleCount(shard, total, k),
                                   values, &norms));
  }
  const json diagnostics = BuildDiagnostics(spec, store_seed, norms, total);
  ASSIGN_OR_RETURN(store::Manifest manifest,
                   store::JoinStoreParts(dir, spec, diagnostics, env));
  if (manifest.num_samples != total) {
    return absl::InternalError(
        absl::StrCat(dir, ": joined ", manifest.num_samples, " samples but ",
                     spec_path, " says ", total));
  }
  // The store is complete; the spec file and its temporaries go, so that the
  // directory equals a whole-store build.
  ASSIGN_OR_RETURN(const std::vector<std::string> names,
                   env->ListDirectory(dir));
  for (const std::string& name : names) {
    if (IsPartsSpecFile(name)) RETURN_IF_ERROR(RemoveFile(env, dir, name));
  }
  RETURN_IF_ERROR(env->SyncDirectory(dir));
  return manifest;
}

}  // namespace retrace::jobs

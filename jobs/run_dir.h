// The training run directory (docs/training.md):
//   run.json          configuration, progress and the checkpoint list
//   ckpt-NNNNNN.pt    model weights after NNNNNN optimizer steps
//                     (UNetModel::Save format)
//   replay.bin        the replay log (server/model/replay.h)
//   loss.csv          "step,loss": mean batch loss of every step done
//   train-state.pt    weights + Adam state + step, for resuming
// Every file is written atomically (temporary file, fsync, rename).
//
// This header has no LibTorch dependency: readers such as the store build use
// LoadRun to find the checkpoints, their weights w_c and the replay log.
#ifndef RETRACE_JOBS_RUN_DIR_H_
#define RETRACE_JOBS_RUN_DIR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/env.h"
#include "server/data/image_set.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"
#include "server/run/model_description.h"

namespace retrace::jobs {

inline constexpr char kRunJsonFile[] = "run.json";
inline constexpr char kTrainStateFile[] = "train-state.pt";
inline constexpr char kLossLogFile[] = "loss.csv";
inline constexpr char kRunFormat[] = "retrace-train-run";
inline constexpr int kRunFormatVersion = 1;
// Names the batch-order definition of batch_order.h, recorded so that a
// future change of it cannot silently resume an old run.
inline constexpr char kBatchOrderName[] = "splitmix64-fisher-yates-drop-last";

// The built-in UNet's hyper-parameters (server/model/unet.h UNetConfig; the
// image shape comes from the data).
struct ModelConfig {
  int64_t base_channels = 16;
  std::vector<int64_t> channel_mults = {1, 2, 4};
  bool attention = true;
  int64_t norm_groups = 8;
};

// Everything that determines a run's results. Two runs with equal configs
// (and data) produce byte-identical checkpoints at the same thread count.
struct TrainConfig {
  // Descriptive: the mixture spec text the data came from (or a test's name)
  // and the mixture seed. The data's own fingerprint is in DatasetInfo.
  std::string dataset_spec;
  uint64_t dataset_seed = 0;
  ModelConfig model;
  model::ScheduleType schedule = model::ScheduleType::kCosine;
  int num_timesteps = model::NoiseSchedule::kDefaultNumTimesteps;
  model::LossType loss = model::LossType::kMse;
  double learning_rate = 1e-3;  // Adam, betas (0.9, 0.999), eps 1e-8
  int64_t batch_size = 32;
  int64_t steps = 600;
  int64_t checkpoint_every = 200;
  // Seeds the UNet initialization, the batch order and the training draws.
  uint64_t run_seed = 0;
};

inline constexpr double kAdamBeta1 = 0.9;
inline constexpr double kAdamBeta2 = 0.999;
inline constexpr double kAdamEps = 1e-8;

// What the run was trained on.
struct DatasetInfo {
  int64_t num_samples = 0;
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  // SHA-256 over the pixels (float32), labels (int32) and sample ids (int64)
  // as stored in memory, little-endian.
  std::string sha256;
};

struct CheckpointInfo {
  std::string file;  // relative to the run directory
  int64_t step = 0;  // optimizer steps done when saved
  std::string sha256;
  double weight = 0;  // w_c = learning rate × steps since the previous one
};

// The contents of run.json.
struct RunManifest {
  TrainConfig config;
  DatasetInfo dataset;
  int64_t parameter_count = 0;
  int threads = 0;         // LibTorch intra-op threads used
  int64_t steps_done = 0;  // steps covered by train-state.pt / checkpoints
  bool complete = false;
  std::vector<CheckpointInfo> checkpoints;
  std::string replay_sha256;  // empty before the first checkpoint
};

// Shape, size and fingerprint of the training data. sample_ids has one entry
// per image.
DatasetInfo DescribeDataset(const data::ImageSet& images,
                            absl::Span<const int64_t> sample_ids);

// SHA-256 (hex) of the manifest's identity (what CheckSameRun compares);
// train-state.pt records it so that a state file cannot resume another run.
std::string RunIdentityDigest(const RunManifest& manifest);

// INVALID_ARGUMENT naming the field when the config cannot be trained
// (non-positive sizes or rate, checkpoint_every > steps is allowed).
absl::Status ValidateTrainConfig(const TrainConfig& config);

// Steps at which checkpoints are saved: K, 2K, ... and `steps` itself when it
// is not a multiple of K.
std::vector<int64_t> CheckpointSteps(int64_t steps, int64_t checkpoint_every);

// "ckpt-000200.pt" for step 200.
std::string CheckpointFileName(int64_t step);

// w_c = learning_rate × (step − previous checkpoint's step).
double CheckpointWeight(const TrainConfig& config, int64_t step);

// run.json text (pretty-printed JSON ending in a newline).
std::string FormatRunJson(const RunManifest& manifest);
// Inverse of FormatRunJson. INVALID_ARGUMENT / DATA_LOSS name `name` and the
// field that is missing or malformed.
absl::StatusOr<RunManifest> ParseRunJson(absl::string_view text,
                                         absl::string_view name);

// OK when the two manifests describe the same run (config, dataset and
// parameter count; thread count and progress are not compared). Otherwise
// FAILED_PRECONDITION naming run_dir and the first differing field with both
// values.
absl::Status CheckSameRun(const RunManifest& existing,
                          const RunManifest& wanted, absl::string_view run_dir);

// loss.csv: a header line "step,loss", then one "step,loss" line per step in
// order, losses printed with 9 significant digits (float round trip).
std::string FormatLossLog(absl::Span<const float> losses);
// DATA_LOSS naming `name` and the line when malformed or steps are not
// 0, 1, 2, ...
absl::StatusOr<std::vector<float>> ParseLossLog(absl::string_view text,
                                                absl::string_view name);

// The model description of a finished run (written as run_dir/model.toml):
// the built-in UNet with the run's hyper-parameters and image shape, its
// checkpoints with sha256 and w_c, schedule, loss, the run's mixture and
// data fingerprint, and the run itself (training.run = ".") for the replay
// slot. Paths are relative to run_dir.
run::ModelDescription DescribeRunModel(const RunManifest& manifest);

// Reads run_dir/run.json. With verify_checksums, also hashes every listed
// checkpoint and replay.bin and returns DATA_LOSS naming the file on a
// mismatch (NOT_FOUND when one is missing).
// run.json is read through `env` (not owned).
absl::StatusOr<RunManifest> LoadRun(const std::string& run_dir,
                                    bool verify_checksums = true,
                                    Env* env = Env::Default());

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_RUN_DIR_H_

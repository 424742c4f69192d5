// DDPM training of the built-in UNet into a run directory (run_dir.h).
//
// Each step s takes the batch BatchOrder gives (batch_order.h), draws every
// position's timestep and noise from the counter RNG keyed by (run seed, s,
// position) (server/model/replay.h), computes the mean per-example loss
// (server/model/diffusion.h) and takes one Adam step. Losses are logged per
// step; at every checkpoint step the weights, the replay log so far, the loss
// log, the resume state and run.json are written, each atomically.
//
// Determinism: with the same config, data and LibTorch thread count, a run
// produces byte-identical checkpoints whether it was interrupted and resumed
// or not (the batch order and draws are pure functions of the step, and the
// resume state holds the exact weights and Adam moments).
#ifndef RETRACE_JOBS_TRAIN_H_
#define RETRACE_JOBS_TRAIN_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "jobs/run_dir.h"
#include "common/env.h"
#include "server/data/image_set.h"
#include "server/model/device.h"

namespace retrace::model {
struct UNetConfig;  // server/model/unet.h
}  // namespace retrace::model

namespace retrace::jobs {

struct TrainOptions {
  std::string run_dir;
  // Continue the run already in run_dir from its train-state.pt. Without it,
  // a run_dir holding any run is refused (FAILED_PRECONDITION). With it, a
  // run_dir without a run starts a new one; a different run is refused.
  bool resume = false;
  // LibTorch intra-op threads (at::set_num_threads, process-wide); 0 keeps
  // the current setting. Results are reproducible at a fixed thread count.
  int threads = 0;
  // Where the model trains (server/model/device.h): kAuto takes CUDA when
  // LibTorch has it and a device is present; kCuda without one is
  // FAILED_PRECONDITION before anything is written. The CPU unless asked
  // (the command line's --device defaults to auto). The batches and draws are
  // the same on every device; checkpoints and the resume state's weights are
  // host tensors and the resume state is read onto this run's device, so a
  // run resumes on either device (its weights then follow
  // the other device's rounding). Byte-identical checkpoints need the same
  // device as well as the same thread count.
  model::DeviceChoice device = model::DeviceChoice::kCpu;
  // Also save train-state.pt every N steps between checkpoints (0: only at
  // checkpoints).
  int64_t save_state_every = 0;
  // Progress output (not owned); null: no progress output.
  std::FILE* progress_out = nullptr;
  bool progress_is_tty = false;
  double progress_interval_s = 5.0;
  // Called after every step with the number of steps done; returning true
  // stops training after saving the resume state (for SIGINT, or tests).
  std::function<bool(int64_t steps_done)> should_stop;
  // The run directory's files are written, committed (fsync, rename, fsync
  // of the directory) and read through this Env (not owned). LibTorch writes
  // checkpoints and train-state.pt to their temporary names itself.
  Env* env = Env::Default();
};

struct TrainResult {
  int64_t start_step = 0;  // steps already done when this call began
  int64_t steps_done = 0;
  bool complete = false;  // steps_done == config.steps
  std::vector<CheckpointInfo> checkpoints;
  double seconds = 0;  // wall time of the steps this call ran
  double steps_per_second = 0;
  double loss_ema = 0;  // moving average of the last losses
};

// Trains on `images` (pixels in [-1, 1], square, height divisible by
// 2^(levels − 1)); sample_ids gives one id per image (empty: 0..N−1).
// Errors: INVALID_ARGUMENT for a bad config or data (batch larger than the
// data, wrong image shape), FAILED_PRECONDITION for a run_dir that holds
// another run (or this one without `resume`), PERMISSION_DENIED / NOT_FOUND
// for an unwritable run_dir, DATA_LOSS for damaged resume files, INTERNAL
// when the loss becomes NaN/Inf or LibTorch fails.
absl::StatusOr<TrainResult> Train(const TrainConfig& config,
                                  const data::ImageSet& images,
                                  absl::Span<const int64_t> sample_ids,
                                  const TrainOptions& options);

// The built-in UNet that a run's ModelConfig describes, for images of
// `image_channels` × `image_size` × `image_size` (the training, the store
// build and the server's query featurizer all build it this way).
model::UNetConfig UNetConfigFor(const ModelConfig& model,
                                int64_t image_channels, int64_t image_size);

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_TRAIN_H_

// Training draws and the replay log, without LibTorch.
//
// Training step s (0-based) draws, for batch position p, the timestep and the
// noise of that example from the counter-based RNG (counter_rng.h):
//   t*  = UniformInt(RngKey{run_seed, kTrainTimestep, s, p, 0}, 0, T)
//   ε*  = GaussianFill(RngKey{run_seed, kTrainNoise, s, p, 0}, numel values)
// so the exact (t*, ε*) a sample received can be regenerated from
// (run seed, step, batch position) alone: training noise is never stored.
//
// The replay log (docs/training.md, "Replay log") records, for every checkpoint
// c and training sample n, the last training step before checkpoint c in which
// n took part: {step, batch position, timestep}, step = -1 when n was not used
// before c. A checkpoint's `step` is the number of completed optimizer steps,
// so "before checkpoint c" means steps s < step_c, and the weights θ_c are
// those in use at step s = step_c.
//
// File format (replay.bin, all integers little-endian; docs/training.md):
//   magic "RTRPLAY1" (8 bytes), uint32 version = 1, uint32 num_timesteps,
//   uint64 run_seed, int64 C, int64 N, int64 batch_size,
//   int64 checkpoint_steps[C], int64 sample_ids[N],
//   records[C][N] of {int64 step, int32 batch_position, int32 timestep},
//   SHA-256 of everything before it as 64 lowercase hex characters.
// ReplayLog is a plain value type: copyable, safe to read from many threads.
#ifndef RETRACE_SERVER_MODEL_REPLAY_H_
#define RETRACE_SERVER_MODEL_REPLAY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace retrace::model {

// The timestep and noise of one training example.
struct TrainDraw {
  int64_t timestep = 0;
  std::vector<float> noise;  // product(shape) values, row-major
};

// t* of (step, batch position), in [0, num_timesteps).
int64_t TrainTimestep(uint64_t run_seed, int64_t step, int64_t batch_position,
                      int num_timesteps);

// Writes ε* of (step, batch position) to out[0..count).
void TrainNoise(uint64_t run_seed, int64_t step, int64_t batch_position,
                float* out, int64_t count);

// (t*, ε*) exactly as training drew them for (step, batch position); `shape`
// is one example's shape, e.g. {C, H, W}. step and batch_position must be
// non-negative and below 2^32 (the RNG counter words); the caller checks.
TrainDraw ReplayDraw(uint64_t run_seed, int64_t step, int64_t batch_position,
                     int num_timesteps, absl::Span<const int64_t> shape);

// One (checkpoint, sample) entry of the replay log.
struct ReplayRecord {
  int64_t step = -1;            // last step before the checkpoint; -1: unseen
  int32_t batch_position = -1;  // position in that step's batch; -1: unseen
  int32_t timestep = -1;        // t* drawn there; -1: unseen

  bool seen() const { return step >= 0; }
  friend bool operator==(const ReplayRecord& a, const ReplayRecord& b) {
    return a.step == b.step && a.batch_position == b.batch_position &&
           a.timestep == b.timestep;
  }
};

// File name of the replay log inside a training run directory.
inline constexpr char kReplayLogFile[] = "replay.bin";

class ReplayLog {
 public:
  ReplayLog() = default;
  // An all-unseen log. INVALID_ARGUMENT on negative sizes, a sample_ids size
  // other than num_samples, or checkpoint steps that are not increasing.
  static absl::StatusOr<ReplayLog> Create(uint64_t run_seed, int num_timesteps,
                                          int64_t batch_size,
                                          std::vector<int64_t> checkpoint_steps,
                                          std::vector<int64_t> sample_ids);

  // Reads run_dir/replay.bin. NOT_FOUND when missing; DATA_LOSS naming the
  // file when the magic, version, size or checksum is wrong.
  static absl::StatusOr<ReplayLog> Load(const std::string& run_dir);
  // Parses the bytes of a replay.bin; `name` appears in error messages.
  static absl::StatusOr<ReplayLog> Parse(absl::string_view bytes,
                                         absl::string_view name);
  // The file's bytes (format above).
  std::string Serialize() const;

  uint64_t run_seed() const { return run_seed_; }
  int num_timesteps() const { return num_timesteps_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t num_checkpoints() const {
    return static_cast<int64_t>(checkpoint_steps_.size());
  }
  int64_t num_samples() const {
    return static_cast<int64_t>(sample_ids_.size());
  }
  const std::vector<int64_t>& checkpoint_steps() const {
    return checkpoint_steps_;
  }
  const std::vector<int64_t>& sample_ids() const { return sample_ids_; }

  // c in [0, num_checkpoints()), n in [0, num_samples()); out of range is a
  // caller bug (aborts).
  const ReplayRecord& At(int64_t c, int64_t n) const;
  ReplayRecord& At(int64_t c, int64_t n);

  // The (t*, ε*) sample n received in its last step before checkpoint c,
  // regenerated from the RNG. FAILED_PRECONDITION when n was unseen then.
  absl::StatusOr<TrainDraw> Draw(int64_t c, int64_t n,
                                 absl::Span<const int64_t> shape) const;

 private:
  uint64_t run_seed_ = 0;
  int num_timesteps_ = 0;
  int64_t batch_size_ = 0;
  std::vector<int64_t> checkpoint_steps_;
  std::vector<int64_t> sample_ids_;
  std::vector<ReplayRecord> records_;  // [C][N]
};

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_REPLAY_H_

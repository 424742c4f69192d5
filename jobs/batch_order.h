// The order in which training visits samples, and the replay log it implies.
//
// Training runs in epochs over the N samples. Epoch e visits them in the order
// of a permutation π_e that is a pure function of (run seed, e); its
// floor(N / B) full batches are steps e·S .. e·S + S − 1 (S = steps per
// epoch) and the last N mod B samples of π_e are skipped that epoch (a
// "drop last" loader), so a sample appears at most once in a batch:
//   sample at (step s, position p) = π_{s / S}[(s mod S)·B + p].
//
// π_e: seeded Fisher–Yates. A SplitMix64 generator starts at state
// run_seed ^ Mix64(e + 1), where Mix64 is SplitMix64's output function; each
// draw adds 0x9e3779b97f4a7c15 to the state and returns Mix64(state). Starting
// from the identity, for i = N−1 down to 1: j = floor(draw · (i + 1) / 2^64)
// (128-bit product), swap π[i] and π[j]. Independent of the standard library,
// so every machine and compiler gives the same order (docs/training.md).
#ifndef RETRACE_JOBS_BATCH_ORDER_H_
#define RETRACE_JOBS_BATCH_ORDER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/model/replay.h"

namespace retrace::jobs {

// SplitMix64's output function (a bijective 64-bit mix).
uint64_t Mix64(uint64_t x);

// π_e as defined above: a permutation of 0..num_samples−1.
std::vector<int64_t> EpochPermutation(uint64_t run_seed, int64_t epoch,
                                      int64_t num_samples);

// Not thread-safe: it caches the permutation of the last epoch asked for.
class BatchOrder {
 public:
  // INVALID_ARGUMENT unless 1 <= batch_size <= num_samples.
  static absl::StatusOr<BatchOrder> Create(uint64_t run_seed,
                                           int64_t num_samples,
                                           int64_t batch_size);

  int64_t num_samples() const { return num_samples_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t steps_per_epoch() const { return num_samples_ / batch_size_; }

  // Sample indices of step `step` (>= 0), in batch-position order.
  std::vector<int64_t> Batch(int64_t step);

 private:
  BatchOrder(uint64_t run_seed, int64_t num_samples, int64_t batch_size)
      : run_seed_(run_seed),
        num_samples_(num_samples),
        batch_size_(batch_size) {}

  uint64_t run_seed_;
  int64_t num_samples_;
  int64_t batch_size_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> cached_permutation_;
};

// The replay log of a run: for each checkpoint step (increasing, each >= 1)
// and sample, the last step before it that used the sample, its batch
// position and the timestep drawn there (server/model/replay.h). A pure
// function of its arguments: training never has to write it incrementally.
// sample_ids has one entry per sample of `order`.
absl::StatusOr<model::ReplayLog> BuildReplayLog(
    uint64_t run_seed, int num_timesteps, BatchOrder& order,
    const std::vector<int64_t>& checkpoint_steps,
    const std::vector<int64_t>& sample_ids);

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_BATCH_ORDER_H_

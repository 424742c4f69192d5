// Test-only re-implementation of the training batch order and replay log
// straight from their definition in docs/training.md (not from jobs/), so the
// tests compare the library against an independent computation.
#ifndef RETRACE_TESTS_JOBS_REFERENCE_ORDER_H_
#define RETRACE_TESTS_JOBS_REFERENCE_ORDER_H_

#include <cstdint>
#include <vector>

#include "server/model/counter_rng.h"
#include "server/model/replay.h"

namespace retrace::jobs::testing {

struct SplitMix64 {
  uint64_t state;
  static uint64_t Finish(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t Next() {
    state += 0x9e3779b97f4a7c15ull;
    return Finish(state);
  }
};

inline std::vector<int64_t> ReferencePermutation(uint64_t seed, int64_t epoch,
                                                 int64_t n) {
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < n; ++i) perm.push_back(i);
  SplitMix64 gen{seed ^ SplitMix64::Finish(static_cast<uint64_t>(epoch + 1))};
  for (int64_t i = n - 1; i >= 1; --i) {
    const unsigned __int128 wide = static_cast<unsigned __int128>(gen.Next()) *
                                   static_cast<uint64_t>(i + 1);
    const int64_t j = static_cast<int64_t>(wide >> 64);
    const int64_t tmp = perm[i];
    perm[i] = perm[j];
    perm[j] = tmp;
  }
  return perm;
}

// Sample index at (step, position) for a drop-last epoch loader.
inline int64_t ReferenceSample(uint64_t seed, int64_t n, int64_t batch,
                               int64_t step, int64_t position) {
  const int64_t per_epoch = n / batch;
  return ReferencePermutation(seed, step / per_epoch,
                              n)[(step % per_epoch) * batch + position];
}

// records[c][n] by brute force: scan all steps below each checkpoint.
inline std::vector<std::vector<model::ReplayRecord>> ReferenceReplay(
    uint64_t seed, int num_timesteps, int64_t n, int64_t batch,
    const std::vector<int64_t>& checkpoint_steps) {
  std::vector<std::vector<model::ReplayRecord>> out;
  for (int64_t checkpoint_step : checkpoint_steps) {
    std::vector<model::ReplayRecord> row(static_cast<size_t>(n));
    for (int64_t step = 0; step < checkpoint_step; ++step) {
      for (int64_t p = 0; p < batch; ++p) {
        model::ReplayRecord& r = row[ReferenceSample(seed, n, batch, step, p)];
        r.step = step;
        r.batch_position = static_cast<int32_t>(p);
        r.timestep = static_cast<int32_t>(model::UniformInt(
            model::RngKey{seed, model::RngStream::kTrainTimestep,
                          static_cast<uint32_t>(step), static_cast<uint32_t>(p),
                          0},
            0, num_timesteps));
      }
    }
    out.push_back(row);
  }
  return out;
}

}  // namespace retrace::jobs::testing

#endif  // RETRACE_TESTS_JOBS_REFERENCE_ORDER_H_

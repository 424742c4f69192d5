// Timestep buckets, timestep placement and RNG keys of featurization
// (docs/featurization.md). No LibTorch: the store, the scorer
// and tests use these without its compile cost.
//
// Buckets: edges e_0 = 0 < e_1 < ... < e_B = T; bucket b is [e_b, e_{b+1}).
// Build side: the j-th timestep of (sample n, checkpoint c, bucket b) is
//   UniformInt(key(store seed, kBuildTimestep; n, c << 16 | b, j), e_b,
//   e_{b+1})
// and its noise is GaussianFill(key(store seed, kBuildNoise; n, c << 16 | b,
// j)). Query side: the k timesteps of bucket b are the floored centres of k
// equal sub-intervals, s_i = e_b + floor((2i + 1)·(e_{b+1} − e_b) / (2k)), i <
// k, and the noise of draw r at s_i is
//   GaussianFill(key(request seed, kQueryNoise; c, b << 16 | i, r)).
//
// All functions are pure and thread-safe.
#ifndef RETRACE_SERVER_FEATURIZE_TIMESTEPS_H_
#define RETRACE_SERVER_FEATURIZE_TIMESTEPS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "server/model/counter_rng.h"

namespace retrace::featurize {

// Limits imposed by the key layout (c and b share one 32-bit word; the last
// key word has 24 bits).
inline constexpr int64_t kMaxCheckpoints = int64_t{1} << 16;
inline constexpr int64_t kMaxBuckets = int64_t{1} << 16;
inline constexpr int64_t kMaxDrawIndex = int64_t{1} << 24;  // j and r
inline constexpr int64_t kMaxSampleIndex = int64_t{1} << 32;

// Ok when edges are strictly increasing from 0 to num_timesteps with at
// least one bucket (and at most kMaxBuckets); INVALID_ARGUMENT otherwise.
absl::Status ValidateBucketEdges(absl::Span<const int64_t> edges,
                                 int64_t num_timesteps);

// B equal buckets: e_b = floor(b·T/B). Requires 1 <= B <= T.
std::vector<int64_t> EqualBucketEdges(int64_t num_buckets,
                                      int64_t num_timesteps);

// Build-side key of draw j for (n, c, b); caller guarantees the limits above.
model::RngKey BuildKey(model::RngStream stream, uint64_t store_seed,
                       int64_t sample, int64_t checkpoint, int64_t bucket,
                       int64_t draw);

// Query-side noise key of draw r at timestep index s_index of bucket b.
model::RngKey QueryNoiseKey(uint64_t request_seed, int64_t checkpoint,
                            int64_t bucket, int64_t s_index, int64_t draw);

// The build-side timestep t_j for (n, c, b) inside [lo, hi).
int64_t BuildTimestep(uint64_t store_seed, int64_t sample, int64_t checkpoint,
                      int64_t bucket, int64_t draw, int64_t lo, int64_t hi);

// The k query timesteps of [lo, hi) (see the file comment). Requires k >= 1
// and lo < hi; when k > hi − lo some timesteps repeat (each still gets its
// own noise, keyed by its index).
std::vector<int64_t> QueryTimesteps(int64_t lo, int64_t hi, int64_t k);

}  // namespace retrace::featurize

#endif  // RETRACE_SERVER_FEATURIZE_TIMESTEPS_H_

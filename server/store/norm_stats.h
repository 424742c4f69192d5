// Per-(checkpoint, slot) statistics of the stored gradient norms: the
// timestep-bias diagnostics that the writer derives itself
// (docs/store-build.md, "Diagnostics").
//
// Pure functions; thread-safe.
#ifndef RETRACE_SERVER_STORE_NORM_STATS_H_
#define RETRACE_SERVER_STORE_NORM_STATS_H_

#include <cstdint>
#include <vector>

#include "nlohmann/json.hpp"

namespace retrace::store {

// Quantile q in [0, 1] of `values` with linear interpolation between the two
// nearest ranks (position q * (n - 1) in sorted order; numpy's default), so
// the median of an even count is the mean of the middle two. `values` is
// taken by value and sorted. NaN when `values` is empty.
double Quantile(std::vector<double> values, double q);

// `norms` holds num_samples rows of C x S floats (the `norms` tensors of all
// shards, in sample order). Returns
//   {"num_samples": N, "mean": [[..S..] x C], "median": [...], "p95": [...]}
// with null entries when N = 0. Sums run in double in sample order, so the
// result is deterministic.
nlohmann::json ComputeNormStats(const std::vector<float>& norms,
                                int64_t num_samples, int64_t num_checkpoints,
                                int64_t num_slots);

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_NORM_STATS_H_

// The statistics of `retrace-batch eval`: rank correlation, top-k overlap,
// detector quality (AUROC, average precision, precision@k, ROC curve), the
// "generally influential" summary of many top-k lists, and bootstrap
// confidence intervals.
//
//   std::vector<double> exact = ..., projected = ...;  // one score per sample
//   double rho = Spearman(exact, projected);
//   double recall = TopKRecall(exact, projected, 10);
//   Interval ci = BootstrapMeanInterval(per_query_rho, 1000, /*seed=*/1);
//
// Conventions shared by every function:
//   - Scores rank "higher is better". Where an order is needed, ties are
//     broken by the lower index, so every result is a pure function of the
//     input (no dependence on the sort implementation).
//   - NaN scores rank below every number, and all NaNs tie with one another
//     (as in kernels/topk.h, NaN is never a proponent). -0 equals +0.
//   - Functions whose result is undefined for their input (sizes that differ,
//     no positives, fewer than two values, ...) return NaN rather than an
//     error: the evaluation reports such a cell as NaN and carries on. Each
//     function lists its NaN cases.
//   - `positive` vectors must have the size of `scores`; otherwise the result
//     is NaN (or empty, for vector results).
//
// Every function is pure and thread-compatible: no state, no allocation kept.
// Nothing here depends on the platform's random number generators, so every
// result (bootstrap included) is the same on every machine.
#ifndef RETRACE_JOBS_EVAL_METRICS_H_
#define RETRACE_JOBS_EVAL_METRICS_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/types/span.h"

namespace retrace::eval {

// 1-based ascending ranks: the smallest value gets rank 1. A group of tied
// values shares the mean of the ranks it spans ({10, 20, 20, 5} →
// {2, 3.5, 3.5, 1}). NaN values rank below every number and tie with each
// other. Empty input gives an empty result.
std::vector<double> AverageRanks(absl::Span<const double> values);

// Spearman's rank correlation: the Pearson correlation of AverageRanks(a) and
// AverageRanks(b), so ties are handled by average ranks (scipy.stats.spearmanr
// gives the same value). The result is clamped to [-1, 1].
// NaN when the sizes differ, n < 2, either side contains a NaN, or either
// side is constant (its ranks have no variance).
double Spearman(absl::Span<const double> a, absl::Span<const double> b);

// Indices of the k largest scores, highest first; equal scores are ordered by
// the lower index, NaN scores come last. k is clamped to [0, scores.size()],
// so k <= 0 gives an empty result and k >= size ranks every index.
std::vector<int64_t> TopK(absl::Span<const double> scores, int64_t k);

// |TopK(reference, k) ∩ TopK(estimate, k)| / k, with k clamped to
// [0, size] first: the share of the reference's top k that the estimate also
// ranks in its top k. NaN when the sizes differ or the clamped k is 0.
double TopKRecall(absl::Span<const double> reference,
                  absl::Span<const double> estimate, int64_t k);

// Area under the ROC curve: the probability that a random positive scores
// above a random negative, a tie counting 1/2 (the Mann–Whitney U statistic
// computed from AverageRanks, divided by positives × negatives). NaN scores
// count as lower than every number and tie with each other.
// NaN when the sizes differ, or there is no positive or no negative.
double Auroc(absl::Span<const double> scores,
             const std::vector<bool>& positive);

// Average precision: rank every sample by score, descending, ties broken by
// the lower index (the order of TopK); for each positive at 1-based rank r,
// take the precision at r (positives among the first r, divided by r); return
// the mean over positives. No interpolation, no tie averaging.
// NaN when the sizes differ or there is no positive.
double AveragePrecision(absl::Span<const double> scores,
                        const std::vector<bool>& positive);

// Share of positives in TopK(scores, k), i.e. positives in the top list
// divided by the list's length (k clamped to [0, size]).
// NaN when the sizes differ or the clamped k is 0.
double PrecisionAtK(absl::Span<const double> scores,
                    const std::vector<bool>& positive, int64_t k);

// ROC curve as (false positive rate, true positive rate) points. The first
// point is (0, 0); then one point per distinct score, from the highest down,
// after admitting every sample with that score (tied scores move together,
// so a tie between a positive and a negative gives a diagonal step); the last
// point is (1, 1). Both coordinates are non-decreasing, and the trapezoidal
// area under the curve equals Auroc. All NaN scores form the last threshold.
// Empty when the sizes differ or there is no positive or no negative.
std::vector<std::pair<double, double>> RocCurve(
    absl::Span<const double> scores, const std::vector<bool>& positive);

// Jaccard index |a ∩ b| / |a ∪ b| of the two inputs taken as sets
// (duplicates and order are ignored). 1 when both are empty.
double Jaccard(absl::Span<const int64_t> a, absl::Span<const int64_t> b);

// What many top-k lists (one per query) have in common.
struct TopListSummary {
  int64_t queries = 0;       // number of lists
  int64_t k = 0;             // size of the first list (0 without lists)
  std::vector<double> taus;  // as given
  // |G_tau| per tau: samples that are in the lists of at least a fraction
  // tau of the queries, i.e. count >= tau * queries, where count is the
  // number of lists containing the sample.
  std::vector<int64_t> generally_influential;
  int64_t unique = 0;  // distinct samples over all lists
  // Mean Jaccard index over all unordered pairs of lists; NaN with fewer
  // than two lists.
  double mean_jaccard = 0;
  // histogram[h], h = 0..queries: number of distinct samples that appear in
  // exactly h lists. histogram[0] is always 0 (a sample in no list is not
  // seen); the entries sum to `unique`.
  std::vector<int64_t> histogram;
};

// Summarizes `lists` (sample indices; one list per query, any sizes; a sample
// repeated within one list counts once for that list). The threshold test
// is count / queries >= tau, evaluated in double, so a tau written as a
// decimal that equals count / queries exactly (0.1 with 3 of 30) is met
// despite rounding. A tau <= 0 counts every sample that appears; NaN taus
// count nothing.
TopListSummary SummarizeTopLists(const std::vector<std::vector<int64_t>>& lists,
                                 absl::Span<const double> taus);

// A closed interval [lo, hi].
// SplitMix64 (Steele, Lea and Flood): the evaluation's seeded generator, the
// same sequence on every platform (unlike the standard library's
// distributions).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_;
};

struct Interval {
  double lo = 0;
  double hi = 0;
};

// Percentile bootstrap interval of the mean at confidence `level`.
// Non-finite values (NaN, ±inf) are dropped first; of the n values left,
// each of `resamples` resamples draws n indices with replacement, index =
// SplitMix64() % n from one SplitMix64 generator seeded with `seed` (drawn in
// order, resample by resample), and takes the mean. The interval is the
// (1 - level) / 2 and (1 + level) / 2 quantiles of the resample means, with
// linear interpolation between order statistics at position q × (R - 1), as
// numpy.quantile's default method. The same inputs and seed give the same
// interval on every platform.
// NaN interval (both ends) when no finite value is left, resamples < 1, or
// level is not inside (0, 1).
Interval BootstrapMeanInterval(absl::Span<const double> values, int resamples,
                               uint64_t seed, double level = 0.95);

// Arithmetic mean of the non-NaN values; NaN when there are none.
double Mean(absl::Span<const double> values);

// Sample standard deviation (denominator n - 1) of the non-NaN values; NaN
// with fewer than two of them.
double SampleSd(absl::Span<const double> values);

}  // namespace retrace::eval

#endif  // RETRACE_JOBS_EVAL_METRICS_H_

// Every ranking here goes through one order (ScoreLess: NaN lowest, then by
// value) and, where a strict order is needed, the lower index breaks ties.
// That keeps TopK, AveragePrecision, PrecisionAtK and RocCurve consistent with
// one another and with the store's top-k selection, and makes each result
// independent of how std::sort happens to arrange equal elements.
//
// The bootstrap uses its own SplitMix64 and a plain modulo instead of
// std::uniform_int_distribution: the standard fixes the engines' output but
// not the distributions', and a report must reproduce from its seed on any
// standard library. The modulo's bias is below n / 2^64, far under the
// bootstrap's own noise.
#include "jobs/eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace retrace::eval {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Strict weak order on scores: NaN below every number, NaNs equivalent.
bool ScoreLess(double a, double b) {
  if (std::isnan(a)) return !std::isnan(b);
  if (std::isnan(b)) return false;
  return a < b;
}

bool ScoreEqual(double a, double b) {
  return !ScoreLess(a, b) && !ScoreLess(b, a);
}

// All indices, highest score first, ties by lower index; only the first
// `k` positions are guaranteed sorted (the rest follow in unspecified order).
std::vector<int64_t> RankedIndices(absl::Span<const double> scores, int64_t k) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  auto better = [&scores](int64_t i, int64_t j) {
    if (ScoreLess(scores[j], scores[i])) return true;
    if (ScoreLess(scores[i], scores[j])) return false;
    return i < j;
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
  return order;
}

int64_t ClampK(int64_t k, size_t size) {
  return std::clamp<int64_t>(k, 0, static_cast<int64_t>(size));
}

// Sorted distinct elements of `v`.
std::vector<int64_t> SortedSet(absl::Span<const int64_t> v) {
  std::vector<int64_t> set(v.begin(), v.end());
  std::sort(set.begin(), set.end());
  set.erase(std::unique(set.begin(), set.end()), set.end());
  return set;
}

double JaccardOfSortedSets(const std::vector<int64_t>& a,
                           const std::vector<int64_t>& b) {
  if (a.empty() && b.empty()) return 1.0;
  size_t common = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++common;
      ++i;
      ++j;
    }
  }
  return static_cast<double>(common) /
         static_cast<double>(a.size() + b.size() - common);
}

// Quantile q of ascending `sorted` (non-empty), numpy's "linear" method,
// including its choice of interpolating from the nearer end.
double LinearQuantile(const std::vector<double>& sorted, double q) {
  double position = q * static_cast<double>(sorted.size() - 1);
  size_t below = static_cast<size_t>(std::floor(position));
  if (below + 1 >= sorted.size()) return sorted.back();
  double t = position - static_cast<double>(below);
  double a = sorted[below];
  double b = sorted[below + 1];
  return t >= 0.5 ? b - (b - a) * (1 - t) : a + (b - a) * t;
}

}  // namespace

std::vector<double> AverageRanks(absl::Span<const double> values) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&values](int64_t i, int64_t j) {
    return ScoreLess(values[i], values[j]);
  });
  std::vector<double> ranks(values.size());
  for (size_t begin = 0; begin < order.size();) {
    size_t end = begin + 1;
    while (end < order.size() &&
           ScoreEqual(values[order[begin]], values[order[end]])) {
      ++end;
    }
    // Positions begin..end-1 hold ranks begin+1..end; their mean:
    double rank = 0.5 * static_cast<double>(begin + 1 + end);
    for (size_t p = begin; p < end; ++p) ranks[order[p]] = rank;
    begin = end;
  }
  return ranks;
}

double Spearman(absl::Span<const double> a, absl::Span<const double> b) {
  if (a.size() != b.size() || a.size() < 2) return kNaN;
  auto has_nan = [](absl::Span<const double> v) {
    return std::any_of(v.begin(), v.end(),
                       [](double x) { return std::isnan(x); });
  };
  if (has_nan(a) || has_nan(b)) return kNaN;
  std::vector<double> ra = AverageRanks(a);
  std::vector<double> rb = AverageRanks(b);
  // Both rank vectors have mean (n + 1) / 2 exactly.
  double mean = 0.5 * static_cast<double>(a.size() + 1);
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < ra.size(); ++i) {
    double da = ra[i] - mean;
    double db = rb[i] - mean;
    sab += da * db;
    saa += da * da;
    sbb += db * db;
  }
  if (saa == 0 || sbb == 0) return kNaN;
  return std::clamp(sab / std::sqrt(saa * sbb), -1.0, 1.0);
}

std::vector<int64_t> TopK(absl::Span<const double> scores, int64_t k) {
  k = ClampK(k, scores.size());
  std::vector<int64_t> order = RankedIndices(scores, k);
  order.resize(k);
  return order;
}

double TopKRecall(absl::Span<const double> reference,
                  absl::Span<const double> estimate, int64_t k) {
  if (reference.size() != estimate.size()) return kNaN;
  k = ClampK(k, reference.size());
  if (k == 0) return kNaN;
  std::vector<int64_t> a = TopK(reference, k);
  std::vector<int64_t> b = TopK(estimate, k);
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  std::vector<int64_t> common;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(),
                        std::back_inserter(common));
  return static_cast<double>(common.size()) / static_cast<double>(k);
}

double Auroc(absl::Span<const double> scores,
             const std::vector<bool>& positive) {
  if (scores.size() != positive.size()) return kNaN;
  std::vector<double> ranks = AverageRanks(scores);
  double positives = 0, rank_sum = 0;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (positive[i]) {
      positives += 1;
      rank_sum += ranks[i];
    }
  }
  double negatives = static_cast<double>(ranks.size()) - positives;
  if (positives == 0 || negatives == 0) return kNaN;
  double u = rank_sum - positives * (positives + 1) / 2;
  return u / (positives * negatives);
}

double AveragePrecision(absl::Span<const double> scores,
                        const std::vector<bool>& positive) {
  if (scores.size() != positive.size()) return kNaN;
  std::vector<int64_t> order =
      TopK(scores, static_cast<int64_t>(scores.size()));
  double hits = 0, precision_sum = 0;
  for (size_t r = 0; r < order.size(); ++r) {
    if (!positive[order[r]]) continue;
    hits += 1;
    precision_sum += hits / static_cast<double>(r + 1);
  }
  return hits == 0 ? kNaN : precision_sum / hits;
}

double PrecisionAtK(absl::Span<const double> scores,
                    const std::vector<bool>& positive, int64_t k) {
  if (scores.size() != positive.size()) return kNaN;
  std::vector<int64_t> top = TopK(scores, k);
  if (top.empty()) return kNaN;
  int64_t hits = 0;
  for (int64_t i : top) hits += positive[i] ? 1 : 0;
  return static_cast<double>(hits) / static_cast<double>(top.size());
}

std::vector<std::pair<double, double>> RocCurve(
    absl::Span<const double> scores, const std::vector<bool>& positive) {
  if (scores.size() != positive.size()) return {};
  int64_t positives = std::count(positive.begin(), positive.end(), true);
  int64_t negatives = static_cast<int64_t>(positive.size()) - positives;
  if (positives == 0 || negatives == 0) return {};
  std::vector<int64_t> order =
      TopK(scores, static_cast<int64_t>(scores.size()));
  std::vector<std::pair<double, double>> curve = {{0.0, 0.0}};
  int64_t tp = 0, fp = 0;
  for (size_t begin = 0; begin < order.size();) {
    size_t end = begin;
    while (end < order.size() &&
           ScoreEqual(scores[order[begin]], scores[order[end]])) {
      (positive[order[end]] ? tp : fp) += 1;
      ++end;
    }
    curve.emplace_back(
        static_cast<double>(fp) / static_cast<double>(negatives),
        static_cast<double>(tp) / static_cast<double>(positives));
    begin = end;
  }
  return curve;
}

double Jaccard(absl::Span<const int64_t> a, absl::Span<const int64_t> b) {
  return JaccardOfSortedSets(SortedSet(a), SortedSet(b));
}

TopListSummary SummarizeTopLists(const std::vector<std::vector<int64_t>>& lists,
                                 absl::Span<const double> taus) {
  TopListSummary summary;
  summary.queries = static_cast<int64_t>(lists.size());
  summary.k = lists.empty() ? 0 : static_cast<int64_t>(lists[0].size());
  summary.taus.assign(taus.begin(), taus.end());
  summary.histogram.assign(lists.size() + 1, 0);

  std::vector<std::vector<int64_t>> sets;
  sets.reserve(lists.size());
  std::vector<int64_t> all;
  for (const std::vector<int64_t>& list : lists) {
    sets.push_back(SortedSet(list));
    all.insert(all.end(), sets.back().begin(), sets.back().end());
  }
  // After sorting, each run of one sample has the length "lists containing
  // the sample".
  std::sort(all.begin(), all.end());
  std::vector<int64_t> counts;
  for (size_t begin = 0; begin < all.size();) {
    size_t end = begin;
    while (end < all.size() && all[end] == all[begin]) ++end;
    counts.push_back(static_cast<int64_t>(end - begin));
    begin = end;
  }
  summary.unique = static_cast<int64_t>(counts.size());
  for (int64_t count : counts) ++summary.histogram[count];
  for (double tau : taus) {
    int64_t members = 0;
    for (int64_t count : counts) {
      // Divide rather than multiply tau by queries: count / queries is the
      // double nearest the exact fraction, as the decimal tau is.
      double share =
          static_cast<double>(count) / static_cast<double>(summary.queries);
      if (share >= tau) ++members;
    }
    summary.generally_influential.push_back(members);
  }

  if (sets.size() < 2) {
    summary.mean_jaccard = kNaN;
  } else {
    double sum = 0;
    int64_t pairs = 0;
    for (size_t i = 0; i < sets.size(); ++i) {
      for (size_t j = i + 1; j < sets.size(); ++j) {
        sum += JaccardOfSortedSets(sets[i], sets[j]);
        ++pairs;
      }
    }
    summary.mean_jaccard = sum / static_cast<double>(pairs);
  }
  return summary;
}

Interval BootstrapMeanInterval(absl::Span<const double> values, int resamples,
                               uint64_t seed, double level) {
  std::vector<double> finite;
  for (double v : values) {
    if (std::isfinite(v)) finite.push_back(v);
  }
  if (finite.empty() || resamples < 1 || !(level > 0 && level < 1)) {
    return {kNaN, kNaN};
  }
  SplitMix64 rng(seed);
  const uint64_t n = finite.size();
  std::vector<double> means;
  means.reserve(resamples);
  for (int r = 0; r < resamples; ++r) {
    double sum = 0;
    for (uint64_t i = 0; i < n; ++i) sum += finite[rng.Next() % n];
    means.push_back(sum / static_cast<double>(n));
  }
  std::sort(means.begin(), means.end());
  return {LinearQuantile(means, (1 - level) / 2),
          LinearQuantile(means, (1 + level) / 2)};
}

double Mean(absl::Span<const double> values) {
  double sum = 0;
  int64_t n = 0;
  for (double v : values) {
    if (std::isnan(v)) continue;
    sum += v;
    ++n;
  }
  return n == 0 ? kNaN : sum / static_cast<double>(n);
}

double SampleSd(absl::Span<const double> values) {
  double mean = Mean(values);
  double squares = 0;
  int64_t n = 0;
  for (double v : values) {
    if (std::isnan(v)) continue;
    squares += (v - mean) * (v - mean);
    ++n;
  }
  return n < 2 ? kNaN : std::sqrt(squares / static_cast<double>(n - 1));
}

}  // namespace retrace::eval

// The evaluation's statistics against values worked out by hand (shown in the
// comments), against scipy / numpy where noted, and against brute-force
// definitions (pair counting for AUROC, the no-ties formula for Spearman).
#include "jobs/eval/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

namespace retrace::eval {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kTol = 1e-12;

TEST(AverageRanksTest, TiesShareTheirMeanRank) {
  EXPECT_EQ(AverageRanks({10, 20, 20, 5}),
            (std::vector<double>{2, 3.5, 3.5, 1}));
  EXPECT_EQ(AverageRanks({7, 7, 7}), (std::vector<double>{2, 2, 2}));
  EXPECT_EQ(AverageRanks({-0.0, 0.0, 1}), (std::vector<double>{1.5, 1.5, 3}));
  EXPECT_TRUE(AverageRanks({}).empty());
}

TEST(AverageRanksTest, NaNRanksLowestAndTies) {
  EXPECT_EQ(AverageRanks({kNaN, 1, kNaN}), (std::vector<double>{1.5, 3, 1.5}));
}

TEST(SpearmanTest, NoTiesMatchesTheRankDifferenceFormula) {
  std::vector<double> a = {3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0};
  std::vector<double> b = {2.7, 1.8, 2.8, 1.1, 8.0, 3.1, 4.1, 5.9};
  // Ranks a: 4 1 5 2 6 8 3 7; b: 3 2 4 1 8 5 6 7; sum d^2 = 26;
  // rho = 1 - 6 * 26 / (8 * 63) = 29 / 42 (scipy.stats.spearmanr agrees).
  EXPECT_NEAR(Spearman(a, b), 29.0 / 42.0, kTol);
  EXPECT_NEAR(Spearman(a, a), 1.0, kTol);
  std::vector<double> reversed = {8, 7, 6, 5, 4, 3, 2, 1};
  std::vector<double> increasing = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_NEAR(Spearman(increasing, reversed), -1.0, kTol);
  // Rank-based: any monotone transform gives 1.
  EXPECT_NEAR(Spearman({1, 2, 3, 4}, {1, 8, 27, 1000}), 1.0, kTol);
}

TEST(SpearmanTest, TiesUseAverageRanks) {
  // Ranks a: 1 2.5 2.5 4 5.5 5.5 7, b: 2 1 3.5 3.5 6 5 7 (mean 4 each):
  // sum da*db = 24.75, sum da^2 = 27, sum db^2 = 27.5,
  // rho = 24.75 / sqrt(27 * 27.5) = 0.9082951062292476 (scipy agrees).
  EXPECT_NEAR(Spearman({1, 2, 2, 3, 4, 4, 5}, {2, 1, 3, 3, 5, 4, 6}),
              24.75 / std::sqrt(27 * 27.5), kTol);
  EXPECT_NEAR(Spearman({1, 2, 2, 3, 4, 4, 5}, {2, 1, 3, 3, 5, 4, 6}),
              0.9082951062292476, kTol);
}

TEST(SpearmanTest, NaNCases) {
  EXPECT_TRUE(std::isnan(Spearman({1, 2, 3}, {1, 2})));        // sizes
  EXPECT_TRUE(std::isnan(Spearman({1}, {1})));                 // n < 2
  EXPECT_TRUE(std::isnan(Spearman({}, {})));                   // n < 2
  EXPECT_TRUE(std::isnan(Spearman({1, 1, 1}, {1, 2, 3})));     // constant
  EXPECT_TRUE(std::isnan(Spearman({1, 2, 3}, {4, 4, 4})));     // constant
  EXPECT_TRUE(std::isnan(Spearman({1, kNaN, 3}, {1, 2, 3})));  // NaN value
}

TEST(TopKTest, HighestFirstTiesByLowerIndex) {
  std::vector<double> s = {0.5, 0.9, 0.5, 0.1, 0.9};
  EXPECT_EQ(TopK(s, 3), (std::vector<int64_t>{1, 4, 0}));
  EXPECT_EQ(TopK(s, 1), (std::vector<int64_t>{1}));
  EXPECT_EQ(TopK(s, 5), (std::vector<int64_t>{1, 4, 0, 2, 3}));
  EXPECT_EQ(TopK(s, 99), (std::vector<int64_t>{1, 4, 0, 2, 3}));  // clamped
  EXPECT_TRUE(TopK(s, 0).empty());
  EXPECT_TRUE(TopK(s, -3).empty());
  EXPECT_TRUE(TopK({}, 3).empty());
}

TEST(TopKTest, NaNComesLast) {
  EXPECT_EQ(TopK({kNaN, -5, kNaN, 2}, 4), (std::vector<int64_t>{3, 1, 0, 2}));
}

TEST(TopKRecallTest, Overlap) {
  std::vector<double> reference = {5, 4, 3, 2, 1};
  std::vector<double> estimate = {1, 4, 3, 2, 5};
  // Top 2: reference {0, 1}, estimate {4, 1}: one in common.
  EXPECT_DOUBLE_EQ(TopKRecall(reference, estimate, 2), 0.5);
  // Top 3: {0, 1, 2} vs {4, 1, 2}.
  EXPECT_DOUBLE_EQ(TopKRecall(reference, estimate, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(TopKRecall(reference, reference, 3), 1.0);
  EXPECT_DOUBLE_EQ(TopKRecall(reference, estimate, 50), 1.0);  // k = n
  EXPECT_TRUE(std::isnan(TopKRecall(reference, estimate, 0)));
  EXPECT_TRUE(std::isnan(TopKRecall(reference, {1, 2}, 1)));
}

// Brute force over all positive-negative pairs, ties counting 1/2.
double PairAuroc(const std::vector<double>& s, const std::vector<bool>& pos) {
  double wins = 0, pairs = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    for (size_t j = 0; j < s.size(); ++j) {
      if (!pos[i] || pos[j]) continue;
      pairs += 1;
      wins += s[i] > s[j] ? 1.0 : s[i] == s[j] ? 0.5 : 0.0;
    }
  }
  return wins / pairs;
}

TEST(AurocTest, TiesCountHalf) {
  // Positives 0.9, 0.8, 0.1; negatives 0.8, 0.3. Pairs: 0.9 beats both (2),
  // 0.8 ties 0.8 (0.5) and beats 0.3 (1), 0.1 loses both: 3.5 / 6.
  std::vector<double> s = {0.9, 0.8, 0.8, 0.3, 0.1};
  std::vector<bool> pos = {true, true, false, false, true};
  EXPECT_NEAR(Auroc(s, pos), 3.5 / 6.0, kTol);
  EXPECT_DOUBLE_EQ(Auroc({1, 1, 1}, {true, false, false}), 0.5);
  EXPECT_DOUBLE_EQ(Auroc({3, 2, 1}, {true, false, false}), 1.0);
  EXPECT_DOUBLE_EQ(Auroc({1, 2, 3}, {true, false, false}), 0.0);
}

TEST(AurocTest, MatchesPairCountingOnRandomTiedScores) {
  constexpr uint32_t kSeed = 20240;
  SCOPED_TRACE(testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed);
  std::vector<double> s(300);
  std::vector<bool> pos(300);
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = static_cast<double>(rng() % 17);  // many ties
    pos[i] = rng() % 5 == 0;
  }
  EXPECT_NEAR(Auroc(s, pos), PairAuroc(s, pos), kTol);
}

TEST(AurocTest, NaNCases) {
  EXPECT_TRUE(std::isnan(Auroc({1, 2}, {false, false})));  // no positive
  EXPECT_TRUE(std::isnan(Auroc({1, 2}, {true, true})));    // no negative
  EXPECT_TRUE(std::isnan(Auroc({1, 2}, {true})));          // sizes
  EXPECT_TRUE(std::isnan(Auroc({}, {})));
  // A NaN score counts below every number.
  EXPECT_DOUBLE_EQ(Auroc({kNaN, 0}, {true, false}), 0.0);
}

TEST(AveragePrecisionTest, MeanPrecisionAtEachPositive) {
  // Positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3.
  std::vector<double> s = {0.9, 0.8, 0.7, 0.6, 0.5};
  std::vector<bool> pos = {true, false, true, false, true};
  EXPECT_NEAR(AveragePrecision(s, pos), (1.0 + 2.0 / 3.0 + 0.6) / 3.0, kTol);
  // Order of scores, not of indices: same as above, shuffled.
  EXPECT_NEAR(AveragePrecision({0.6, 0.5, 0.9, 0.7, 0.8},
                               {false, true, true, true, false}),
              (1.0 + 2.0 / 3.0 + 0.6) / 3.0, kTol);
  EXPECT_DOUBLE_EQ(AveragePrecision({3, 2, 1}, {true, true, false}), 1.0);
}

TEST(AveragePrecisionTest, TiesBrokenByLowerIndex) {
  // All tied: order 0, 1, 2; the positive is at rank 3.
  EXPECT_NEAR(AveragePrecision({0.5, 0.5, 0.5}, {false, false, true}),
              1.0 / 3.0, kTol);
  EXPECT_DOUBLE_EQ(AveragePrecision({0.5, 0.5, 0.5}, {true, false, false}),
                   1.0);
}

TEST(AveragePrecisionTest, NaNCases) {
  EXPECT_TRUE(std::isnan(AveragePrecision({1, 2}, {false, false})));
  EXPECT_TRUE(std::isnan(AveragePrecision({1, 2}, {true})));
  EXPECT_TRUE(std::isnan(AveragePrecision({}, {})));
}

TEST(PrecisionAtKTest, ShareOfPositivesInTheTopList) {
  std::vector<double> s = {0.9, 0.8, 0.7, 0.6, 0.5};
  std::vector<bool> pos = {true, false, true, false, true};
  EXPECT_DOUBLE_EQ(PrecisionAtK(s, pos, 1), 1.0);
  EXPECT_DOUBLE_EQ(PrecisionAtK(s, pos, 2), 0.5);
  EXPECT_DOUBLE_EQ(PrecisionAtK(s, pos, 3), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(PrecisionAtK(s, pos, 10), 3.0 / 5.0);  // clamped to 5
  // Ties by lower index: top 1 of {0.5, 0.5} is index 0.
  EXPECT_DOUBLE_EQ(PrecisionAtK({0.5, 0.5}, {false, true}, 1), 0.0);
  EXPECT_TRUE(std::isnan(PrecisionAtK(s, pos, 0)));
  EXPECT_TRUE(std::isnan(PrecisionAtK(s, {true}, 1)));
}

// Trapezoidal area under a curve of (x, y) points.
double Area(const std::vector<std::pair<double, double>>& curve) {
  double area = 0;
  for (size_t i = 1; i < curve.size(); ++i) {
    area += (curve[i].first - curve[i - 1].first) *
            (curve[i].second + curve[i - 1].second) / 2;
  }
  return area;
}

TEST(RocCurveTest, PointsPerDistinctScore) {
  // P = 3, N = 2. Thresholds 0.9: tp 1 fp 0; 0.8 (a positive and a negative
  // tied): tp 2 fp 1; 0.3: tp 2 fp 2; 0.1: tp 3 fp 2.
  std::vector<double> s = {0.9, 0.8, 0.8, 0.3, 0.1};
  std::vector<bool> pos = {true, true, false, false, true};
  std::vector<std::pair<double, double>> expected = {
      {0, 0}, {0, 1.0 / 3}, {0.5, 2.0 / 3}, {1, 2.0 / 3}, {1, 1}};
  std::vector<std::pair<double, double>> curve = RocCurve(s, pos);
  ASSERT_EQ(curve.size(), expected.size());
  for (size_t i = 0; i < curve.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "point " << i);
    EXPECT_NEAR(curve[i].first, expected[i].first, kTol);
    EXPECT_NEAR(curve[i].second, expected[i].second, kTol);
  }
  EXPECT_NEAR(Area(curve), 3.5 / 6.0, kTol);
}

TEST(RocCurveTest, EndpointsMonotoneAndAreaEqualsAuroc) {
  constexpr uint32_t kSeed = 77;
  SCOPED_TRACE(testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed);
  std::vector<double> s(500);
  std::vector<bool> pos(500);
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = static_cast<double>(rng() % 40) / 8.0;
    pos[i] = rng() % 7 == 0;
  }
  s[3] = kNaN;  // the NaN threshold comes last
  std::vector<std::pair<double, double>> curve = RocCurve(s, pos);
  ASSERT_GE(curve.size(), 2u);
  EXPECT_EQ(curve.front(), (std::pair<double, double>{0.0, 0.0}));
  EXPECT_EQ(curve.back(), (std::pair<double, double>{1.0, 1.0}));
  for (size_t i = 1; i < curve.size(); ++i) {
    EXPECT_GE(curve[i].first, curve[i - 1].first) << "point " << i;
    EXPECT_GE(curve[i].second, curve[i - 1].second) << "point " << i;
  }
  EXPECT_NEAR(Area(curve), Auroc(s, pos), 1e-12);
}

TEST(RocCurveTest, EmptyWhenUndefined) {
  EXPECT_TRUE(RocCurve({1, 2}, {false, false}).empty());
  EXPECT_TRUE(RocCurve({1, 2}, {true, true}).empty());
  EXPECT_TRUE(RocCurve({1, 2}, {true}).empty());
}

TEST(JaccardTest, SetsIgnoreOrderAndDuplicates) {
  EXPECT_DOUBLE_EQ(Jaccard({1, 2, 3}, {5, 4, 3, 2}), 2.0 / 5.0);
  EXPECT_DOUBLE_EQ(Jaccard({1, 1, 2}, {2, 2}), 0.5);
  EXPECT_DOUBLE_EQ(Jaccard({1, 2}, {2, 1}), 1.0);
  EXPECT_DOUBLE_EQ(Jaccard({1, 2}, {3}), 0.0);
  EXPECT_DOUBLE_EQ(Jaccard({}, {3}), 0.0);
  EXPECT_DOUBLE_EQ(Jaccard({}, {}), 1.0);
}

TEST(SummarizeTopListsTest, SmallExampleByHand) {
  std::vector<std::vector<int64_t>> lists = {
      {1, 2, 3}, {2, 3, 4}, {3, 5, 6}, {7, 8, 9}};
  TopListSummary s = SummarizeTopLists(lists, {0.25, 0.5, 0.75, 1.0});
  EXPECT_EQ(s.queries, 4);
  EXPECT_EQ(s.k, 3);
  EXPECT_EQ(s.taus, (std::vector<double>{0.25, 0.5, 0.75, 1.0}));
  // Lists containing each sample: 3 in three, 2 in two, the other seven in
  // one. count >= tau * 4: >= 1: 9, >= 2: 2, >= 3: 1, >= 4: 0.
  EXPECT_EQ(s.generally_influential, (std::vector<int64_t>{9, 2, 1, 0}));
  EXPECT_EQ(s.unique, 9);
  EXPECT_EQ(s.histogram, (std::vector<int64_t>{0, 7, 1, 1, 0}));
  // Pairs: (0,1) 2/4, (0,2) 1/5, (0,3) 0, (1,2) 1/5, (1,3) 0, (2,3) 0.
  EXPECT_NEAR(s.mean_jaccard, (0.5 + 0.2 + 0.2) / 6.0, kTol);
}

TEST(SummarizeTopListsTest, DecimalTauMeetsAnExactShare) {
  // 3 of 30 lists contain sample 0; 0.1 * 30 is 3.0000000000000004 in
  // double, but 3 / 30 >= 0.1 must hold.
  std::vector<std::vector<int64_t>> lists(30, std::vector<int64_t>{1});
  for (int i = 0; i < 3; ++i) lists[i] = {0, 1};
  TopListSummary s = SummarizeTopLists(lists, {0.1, 0.11, 1.0});
  EXPECT_EQ(s.generally_influential, (std::vector<int64_t>{2, 1, 1}));
  EXPECT_EQ(s.k, 2);
  EXPECT_EQ(s.unique, 2);
  EXPECT_EQ(s.histogram[3], 1);
  EXPECT_EQ(s.histogram[30], 1);
}

TEST(SummarizeTopListsTest, RepeatsWithinAListCountOnce) {
  TopListSummary s = SummarizeTopLists({{4, 4, 5}, {4}}, {1.0});
  EXPECT_EQ(s.generally_influential, (std::vector<int64_t>{1}));
  EXPECT_EQ(s.histogram, (std::vector<int64_t>{0, 1, 1}));
  EXPECT_NEAR(s.mean_jaccard, 0.5, kTol);
}

TEST(SummarizeTopListsTest, FewLists) {
  TopListSummary one = SummarizeTopLists({{1, 2}}, {0.5});
  EXPECT_EQ(one.queries, 1);
  EXPECT_EQ(one.unique, 2);
  EXPECT_EQ(one.generally_influential, (std::vector<int64_t>{2}));
  EXPECT_EQ(one.histogram, (std::vector<int64_t>{0, 2}));
  EXPECT_TRUE(std::isnan(one.mean_jaccard));

  TopListSummary none = SummarizeTopLists({}, {0.5});
  EXPECT_EQ(none.queries, 0);
  EXPECT_EQ(none.k, 0);
  EXPECT_EQ(none.unique, 0);
  EXPECT_EQ(none.generally_influential, (std::vector<int64_t>{0}));
  EXPECT_EQ(none.histogram, (std::vector<int64_t>{0}));
  EXPECT_TRUE(std::isnan(none.mean_jaccard));
}

TEST(BootstrapMeanIntervalTest, ContainsTheMeanAndIsDeterministic) {
  std::vector<double> v = {1, 2, 3, 4, 5};
  Interval a = BootstrapMeanInterval(v, 1000, 42);
  Interval b = BootstrapMeanInterval(v, 1000, 42);
  EXPECT_LT(a.lo, 3.0);
  EXPECT_GT(a.hi, 3.0);
  EXPECT_GE(a.lo, 1.0);
  EXPECT_LE(a.hi, 5.0);
  EXPECT_EQ(a.lo, b.lo);
  EXPECT_EQ(a.hi, b.hi);
  // A wider level gives a wider interval from the same resamples.
  Interval wide = BootstrapMeanInterval(v, 1000, 42, 0.99);
  EXPECT_LE(wide.lo, a.lo);
  EXPECT_GE(wide.hi, a.hi);
}

TEST(BootstrapMeanIntervalTest, MatchesAnIndependentPythonComputation) {
  // Computed with Python integers for SplitMix64 (state += 0x9e3779b97f4a7c15,
  // the usual three mixing steps), index = draw % n, and
  // numpy.quantile(means, [(1 - level) / 2, (1 + level) / 2]).
  Interval a = BootstrapMeanInterval({1, 2, 3, 4, 5}, 1000, 42);
  EXPECT_NEAR(a.lo, 1.8, 1e-12);
  EXPECT_NEAR(a.hi, 4.2, 1e-12);
  Interval b = BootstrapMeanInterval({0.3, -0.1, 0.25, 0.8, 0.05, 0.4, 0.12},
                                     500, 7, 0.9);
  EXPECT_NEAR(b.lo, 0.09571428571428572, 1e-12);
  EXPECT_NEAR(b.hi, 0.4428571428571429, 1e-12);
}

TEST(BootstrapMeanIntervalTest, NonFiniteValuesAreDropped) {
  Interval clean = BootstrapMeanInterval({1, 2, 3, 4, 5}, 300, 9);
  Interval noisy = BootstrapMeanInterval(
      {1, kNaN, 2, 3, std::numeric_limits<double>::infinity(), 4, 5}, 300, 9);
  EXPECT_EQ(clean.lo, noisy.lo);
  EXPECT_EQ(clean.hi, noisy.hi);
  Interval constant = BootstrapMeanInterval({2.5, 2.5}, 100, 1);
  EXPECT_EQ(constant.lo, 2.5);
  EXPECT_EQ(constant.hi, 2.5);
}

TEST(BootstrapMeanIntervalTest, NaNCases) {
  auto is_nan = [](Interval i) { return std::isnan(i.lo) && std::isnan(i.hi); };
  EXPECT_TRUE(is_nan(BootstrapMeanInterval({}, 100, 1)));
  EXPECT_TRUE(is_nan(BootstrapMeanInterval({kNaN, kNaN}, 100, 1)));
  EXPECT_TRUE(is_nan(BootstrapMeanInterval({1, 2}, 0, 1)));
  EXPECT_TRUE(is_nan(BootstrapMeanInterval({1, 2}, 100, 1, 1.0)));
  EXPECT_TRUE(is_nan(BootstrapMeanInterval({1, 2}, 100, 1, 0.0)));
}

TEST(MeanTest, SkipsNaN) {
  std::vector<double> v = {2, 4, 4, 4, kNaN, 5, 5, 7, 9};
  EXPECT_DOUBLE_EQ(Mean(v), 5.0);
  // Squared deviations sum to 32 over 8 values: sqrt(32 / 7).
  EXPECT_NEAR(SampleSd(v), std::sqrt(32.0 / 7.0), kTol);
  EXPECT_TRUE(std::isnan(Mean({})));
  EXPECT_TRUE(std::isnan(Mean({kNaN})));
  EXPECT_TRUE(std::isnan(SampleSd({3.0})));
  EXPECT_TRUE(std::isnan(SampleSd({3.0, kNaN})));
  EXPECT_DOUBLE_EQ(SampleSd({3.0, 5.0}), std::sqrt(2.0));
}

}  // namespace
}  // namespace retrace::eval

// Test helpers for the scoring scan: random stores and queries, a brute-force
// double-precision reference written independently of the kernels, and a
// checker for ranked lists.
#ifndef RETRACE_TESTS_KERNELS_SCORING_TEST_UTIL_H_
#define RETRACE_TESTS_KERNELS_SCORING_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/scoring.h"

namespace retrace::kernels::testing {

// Float scores against the double reference: the error allowed, relative to
// the sum of the absolute values of all terms of the score.
constexpr double kF32MaxRelErr = 2e-5;
// The CUDA tensor-core path (scoring.h): the same allowance for the fp32
// accumulation (the hardware adds 16 products per step, so a dot has D/8
// rounded adds against the fp32 path's D), plus the error of the split
// query, at most 2^-16 of each value for bf16 (2^-22 for fp16) and so at most
// 2^-16 of the sum of absolute terms.
constexpr double kTensorCoreMaxRelErr = kF32MaxRelErr + 1.0 / 65536.0;
// The CPU matrix-unit path (scoring.h, kAmx on fp16 and bf16 stores): the
// fp32 allowance plus the split query's 2^-16.
constexpr double kAmxMaxRelErr = kF32MaxRelErr + 1.0 / 65536.0;

// The allowance for ScanCpu with `isa` on a store of `dtype`.
inline double CpuScanRelErr(CpuIsa isa, DType dtype) {
  CpuIsa chosen = isa;
  if (!ChooseCpuScanIsa(isa, dtype, &chosen).ok()) return kF32MaxRelErr;
  return chosen == CpuIsa::kAmx ? kAmxMaxRelErr : kF32MaxRelErr;
}

struct TestStore {
  StoreLayout layout;
  int64_t rows = 0;
  std::vector<uint8_t> bytes;  // [rows, C, S, D] in layout.dtype
  std::vector<double> values;  // the same values, decoded
  std::vector<float> norms;    // [rows, C, S]

  StoreChunk Chunk(int64_t first_row = 0, int64_t count = -1) const {
    if (count < 0) count = rows - first_row;
    StoreChunk c;
    c.vectors =
        bytes.data() + first_row * layout.RowValues() * DTypeSize(layout.dtype);
    c.norms = norms.data() + first_row * layout.SlotPairs();
    c.rows = count;
    c.first_index = first_row;
    return c;
  }
};

inline void StoreValue(TestStore* s, int64_t i, float v) {
  switch (s->layout.dtype) {
    case DType::kF16: {
      uint16_t h = FloatToHalf(v);
      std::memcpy(&s->bytes[size_t(i) * 2], &h, 2);
      s->values[size_t(i)] = HalfToFloat(h);
      break;
    }
    case DType::kBF16: {
      uint16_t h = FloatToBf16(v);
      std::memcpy(&s->bytes[size_t(i) * 2], &h, 2);
      s->values[size_t(i)] = Bf16ToFloat(h);
      break;
    }
    case DType::kF32:
      std::memcpy(&s->bytes[size_t(i) * 4], &v, 4);
      s->values[size_t(i)] = v;
      break;
  }
}

inline TestStore MakeStore(DType dtype, int c, int s, int d, int64_t rows,
                           uint64_t seed) {
  TestStore st;
  st.layout = StoreLayout{dtype, c, s, d};
  st.rows = rows;
  const int64_t n = rows * st.layout.RowValues();
  st.bytes.resize(size_t(n * DTypeSize(dtype)));
  st.values.resize(size_t(n));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(float(d));
  for (int64_t i = 0; i < n; ++i) StoreValue(&st, i, normal(rng) * scale);
  std::uniform_real_distribution<float> norm(0.1f, 10.0f);
  st.norms.resize(size_t(rows * st.layout.SlotPairs()));
  for (float& x : st.norms) x = norm(rng);
  return st;
}

struct TestQueries {
  int32_t num_queries = 0;
  std::vector<float> raw, unit, tracin_weights, retrac_weights;

  QueryBatch Batch() const {
    return QueryBatch{num_queries, raw.data(), unit.data(),
                      tracin_weights.data(), retrac_weights.data()};
  }
  // Query q alone, as a batch of one.
  TestQueries Single(int q, const StoreLayout& layout) const {
    const size_t v = size_t(layout.RowValues()), w = size_t(layout.SlotPairs());
    TestQueries t;
    t.num_queries = 1;
    t.raw.assign(raw.begin() + q * v, raw.begin() + (q + 1) * v);
    t.unit.assign(unit.begin() + q * v, unit.begin() + (q + 1) * v);
    t.tracin_weights.assign(tracin_weights.begin() + q * w,
                            tracin_weights.begin() + (q + 1) * w);
    t.retrac_weights.assign(retrac_weights.begin() + q * w,
                            retrac_weights.begin() + (q + 1) * w);
    return t;
  }
};

// Weights are 0 (slot left out) about one time in five.
inline TestQueries MakeQueries(const StoreLayout& layout, int32_t nq,
                               uint64_t seed) {
  TestQueries q;
  q.num_queries = nq;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(0.25f, 2.0f);
  std::uniform_int_distribution<int> fifth(0, 4);
  q.raw.resize(size_t(nq * layout.RowValues()));
  q.unit.resize(q.raw.size());
  for (float& x : q.raw) x = 3.0f * normal(rng);
  for (float& x : q.unit) x = normal(rng) / std::sqrt(float(layout.dim));
  q.tracin_weights.resize(size_t(nq * layout.SlotPairs()));
  q.retrac_weights.resize(q.tracin_weights.size());
  for (float& x : q.tracin_weights) x = fifth(rng) == 0 ? 0.0f : weight(rng);
  for (float& x : q.retrac_weights) x = fifth(rng) == 0 ? 0.0f : weight(rng);
  return q;
}

// Double-precision scores by the definition, with the magnitude (sum of
// absolute terms) that scales the tolerance. Indexed [(n * Q + q) * 2 + m].
struct Reference {
  int32_t num_queries = 0;
  std::vector<double> score, magnitude;
  std::vector<double> breakdown;  // [((n * Q + q) * 2 + m) * CS + cs]

  double Score(int64_t n, int q, int m) const {
    return score[size_t((n * num_queries + q) * 2 + m)];
  }
  double Magnitude(int64_t n, int q, int m) const {
    return magnitude[size_t((n * num_queries + q) * 2 + m)];
  }
};

inline Reference BruteForce(const TestStore& st, const TestQueries& qs) {
  const int64_t cs_count = st.layout.SlotPairs();
  const int64_t d = st.layout.dim;
  Reference ref;
  ref.num_queries = qs.num_queries;
  const size_t n_out = size_t(st.rows * qs.num_queries * 2);
  ref.score.assign(n_out, 0.0);
  ref.magnitude.assign(n_out, 0.0);
  ref.breakdown.assign(n_out * size_t(cs_count), 0.0);
  for (int64_t n = 0; n < st.rows; ++n) {
    for (int q = 0; q < qs.num_queries; ++q) {
      for (int64_t cs = 0; cs < cs_count; ++cs) {
        const double* u = &st.values[size_t((n * cs_count + cs) * d)];
        const float* raw = &qs.raw[size_t((q * cs_count + cs) * d)];
        const float* unit = &qs.unit[size_t((q * cs_count + cs) * d)];
        double dot_raw = 0, dot_unit = 0, abs_raw = 0, abs_unit = 0;
        for (int64_t i = 0; i < d; ++i) {
          dot_raw += u[i] * raw[i];
          dot_unit += u[i] * unit[i];
          abs_raw += std::fabs(u[i] * raw[i]);
          abs_unit += std::fabs(u[i] * unit[i]);
        }
        const double a_tr = qs.tracin_weights[size_t(q * cs_count + cs)];
        const double a_rt = qs.retrac_weights[size_t(q * cs_count + cs)];
        const double norm = st.norms[size_t(n * cs_count + cs)];
        const size_t o = size_t((n * qs.num_queries + q) * 2);
        ref.score[o] += a_tr * norm * dot_raw;
        ref.score[o + 1] += a_rt * dot_unit;
        ref.magnitude[o] += std::fabs(a_tr * norm) * abs_raw;
        ref.magnitude[o + 1] += std::fabs(a_rt) * abs_unit;
        ref.breakdown[o * size_t(cs_count) + size_t(cs)] =
            a_tr * norm * dot_raw;
        ref.breakdown[(o + 1) * size_t(cs_count) + size_t(cs)] =
            a_rt * dot_unit;
      }
    }
  }
  return ref;
}

// Checks one ranked list against the reference: length k, no repeated index,
// each score matches its sample's reference score, the order is the contract's
// (score, then lower index), and position by position the reference score of
// the returned sample equals the reference score that position should hold,
// so indices may differ from the exact ranking only between near-tied values.
inline void ExpectRankedList(const std::vector<ScoredSample>& got,
                             const Reference& ref, int64_t rows, int q, int m,
                             bool top, int k, double rel_err = kF32MaxRelErr) {
  SCOPED_TRACE(std::string(top ? "top" : "bottom") + " list, query " +
               std::to_string(q) + ", method " + std::to_string(m));
  ASSERT_EQ(got.size(), size_t(k));
  std::vector<int64_t> order(static_cast<size_t>(rows));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return top ? ref.Score(a, q, m) > ref.Score(b, q, m)
               : ref.Score(a, q, m) < ref.Score(b, q, m);
  });
  double max_magnitude = 0;
  for (int64_t n = 0; n < rows; ++n) {
    max_magnitude = std::max(max_magnitude, ref.Magnitude(n, q, m));
  }
  std::set<int64_t> seen;
  for (int i = 0; i < k; ++i) {
    const ScoredSample& s = got[size_t(i)];
    ASSERT_GE(s.index, 0);
    ASSERT_LT(s.index, rows);
    EXPECT_TRUE(seen.insert(s.index).second)
        << "index " << s.index << " repeated";
    const double want = ref.Score(s.index, q, m);
    const double tol = rel_err * ref.Magnitude(s.index, q, m) + 1e-30;
    EXPECT_NEAR(s.score, want, tol) << "rank " << i << " index " << s.index;
    const double expected_here = ref.Score(order[size_t(i)], q, m);
    EXPECT_NEAR(want, expected_here, 2 * rel_err * max_magnitude + 1e-30)
        << "rank " << i << ": got index " << s.index << ", exact ranking has "
        << order[size_t(i)];
    if (i > 0) {
      const ScoredSample& p = got[size_t(i - 1)];
      if (top) {
        EXPECT_GE(p.score, s.score) << "rank " << i;
      } else {
        EXPECT_LE(p.score, s.score) << "rank " << i;
      }
      if (p.score == s.score)
        EXPECT_LT(p.index, s.index) << "tie at rank " << i;
    }
  }
}

inline void ExpectMatchesReference(const ScanResult& result,
                                   const Reference& ref, int64_t rows, int k,
                                   bool want_bottom,
                                   double rel_err = kF32MaxRelErr) {
  ASSERT_EQ(result.per_query.size(), size_t(ref.num_queries));
  for (int q = 0; q < ref.num_queries; ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      const RankedList& list = result.Get(q, static_cast<Method>(m));
      ExpectRankedList(list.top, ref, rows, q, m, true, k, rel_err);
      if (want_bottom) {
        ExpectRankedList(list.bottom, ref, rows, q, m, false, k, rel_err);
      } else {
        EXPECT_TRUE(list.bottom.empty());
      }
    }
  }
}

// Bit-for-bit equality of two results (indices, scores and breakdowns).
inline void ExpectIdentical(const ScanResult& a, const ScanResult& b) {
  ASSERT_EQ(a.per_query.size(), b.per_query.size());
  for (size_t q = 0; q < a.per_query.size(); ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      for (int bottom = 0; bottom < 2; ++bottom) {
        const auto& la = bottom ? a.per_query[q][size_t(m)].bottom
                                : a.per_query[q][size_t(m)].top;
        const auto& lb = bottom ? b.per_query[q][size_t(m)].bottom
                                : b.per_query[q][size_t(m)].top;
        ASSERT_EQ(la.size(), lb.size());
        for (size_t i = 0; i < la.size(); ++i) {
          EXPECT_EQ(la[i].index, lb[i].index)
              << "query " << q << " method " << m << " bottom " << bottom
              << " rank " << i;
          EXPECT_EQ(FloatBits(la[i].score), FloatBits(lb[i].score))
              << "query " << q << " method " << m << " bottom " << bottom
              << " rank " << i;
          EXPECT_EQ(la[i].breakdown, lb[i].breakdown);
        }
      }
    }
  }
}

}  // namespace retrace::kernels::testing

#endif  // RETRACE_TESTS_KERNELS_SCORING_TEST_UTIL_H_

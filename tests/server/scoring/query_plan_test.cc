#include "server/scoring/query_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace retrace::scoring {
namespace {

struct TinyStore {
  StoreShape shape;
  // u[n][c][s][d], norm[n][c][s]
  std::vector<double> u, norm;
  int64_t n = 0;
};

TinyStore MakeStore(int64_t n, int32_t c, int32_t b, bool replay, int64_t d,
                    uint32_t seed) {
  TinyStore t;
  t.n = n;
  t.shape.num_checkpoints = c;
  t.shape.num_buckets = b;
  t.shape.has_replay = replay;
  t.shape.dim = d;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uni(-1, 1), pos(0.1, 3);
  for (int32_t i = 0; i < c; ++i)
    t.shape.checkpoint_weights.push_back(0.5f + i);
  const int32_t s = t.shape.num_slots();
  t.u.resize(n * c * s * d);
  t.norm.resize(n * c * s);
  for (double& v : t.u) v = uni(rng);
  for (double& v : t.norm) v = pos(rng);
  return t;
}

BucketQuery MakeQuery(const StoreShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1, 1);
  BucketQuery q;
  const size_t size = static_cast<size_t>(shape.num_checkpoints) *
                      shape.num_buckets * shape.dim;
  q.raw.resize(size);
  q.unit.resize(size);
  for (float& v : q.raw) v = uni(rng);
  for (float& v : q.unit) v = uni(rng);
  return q;
}

// score(n) = Σ_{c,s} a_{c,s} f(n,c,s) <u, q>: the generic scan, in double.
double GenericScore(const TinyStore& t, const SlotPlan& p, int64_t n,
                    bool tracin) {
  const int32_t cs = t.shape.num_checkpoints * t.shape.num_slots();
  const int64_t d = t.shape.dim;
  double total = 0;
  for (int32_t k = 0; k < cs; ++k) {
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) {
      dot += t.u[(n * cs + k) * d + j] *
             (tracin ? p.query_raw[k * d + j] : p.query_unit[k * d + j]);
    }
    total += tracin ? p.weight_tracin[k] * t.norm[n * cs + k] * dot
                    : p.weight_retrac[k] * dot;
  }
  return total;
}

// The score formulas (docs/scoring.md) written out directly for one sample,
// with explicit filters.
double DesignScore(const TinyStore& t, const BucketQuery& q, int64_t n,
                   bool tracin, Pairing pairing, const std::vector<int>& cs_sel,
                   const std::vector<int>& bs_sel) {
  const int32_t C = t.shape.num_checkpoints, B = t.shape.num_buckets;
  const int32_t S = t.shape.num_slots();
  const int64_t D = t.shape.dim;
  auto u = [&](int c, int s, int64_t j) {
    return t.u[((n * C + c) * S + s) * D + j];
  };
  auto g = [&](int c, int s) { return t.norm[(n * C + c) * S + s]; };
  auto qv = [&](int c, int b, int64_t j) {
    const auto& v = tracin ? q.raw : q.unit;
    return static_cast<double>(v[(c * B + b) * D + j]);
  };
  double total = 0;
  for (int c : cs_sel) {
    const double w = t.shape.checkpoint_weights[c];
    if (pairing == Pairing::kMatched) {
      for (int b : bs_sel) {
        double dot = 0;
        for (int64_t j = 0; j < D; ++j) dot += u(c, b, j) * qv(c, b, j);
        total += w * (tracin ? g(c, b) : 1.0) * dot;
      }
    } else {
      double dot = 0;
      for (int64_t j = 0; j < D; ++j) {
        double mean = 0;
        for (int b : bs_sel) mean += qv(c, b, j);
        dot += u(c, B, j) * mean / bs_sel.size();
      }
      total += w * (tracin ? g(c, B) : 1.0) * dot;
    }
  }
  return total;
}

struct Case {
  Pairing pairing;
  std::vector<int32_t> checkpoints, buckets;
};

TEST(QueryPlanTest, MatchesDesignFormulas) {
  const TinyStore t = MakeStore(7, 3, 4, true, 5, 11);
  const BucketQuery q = MakeQuery(t.shape, 12);
  const std::vector<Case> cases = {
      {Pairing::kMatched, {}, {}},
      {Pairing::kMatched, {2, 0}, {1}},
      {Pairing::kReplay, {}, {}},
      {Pairing::kReplay, {1}, {0, 3}},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE(testing::Message()
                 << "pairing=" << static_cast<int>(cs.pairing) << " nc="
                 << cs.checkpoints.size() << " nb=" << cs.buckets.size());
    auto plan = PlanQuery(t.shape, q, {cs.pairing, cs.checkpoints, cs.buckets});
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::vector<int> csel, bsel;
    for (int c = 0; c < 3; ++c)
      if (cs.checkpoints.empty() ||
          std::find(cs.checkpoints.begin(), cs.checkpoints.end(), c) !=
              cs.checkpoints.end())
        csel.push_back(c);
    for (int b = 0; b < 4; ++b)
      if (cs.buckets.empty() || std::find(cs.buckets.begin(), cs.buckets.end(),
                                          b) != cs.buckets.end())
        bsel.push_back(b);
    for (int64_t n = 0; n < t.n; ++n) {
      for (bool tracin : {true, false}) {
        const double want =
            DesignScore(t, q, n, tracin, cs.pairing, csel, bsel);
        const double got = GenericScore(t, *plan, n, tracin);
        EXPECT_NEAR(got, want, 1e-5 * (1 + std::fabs(want))) << "n=" << n;
      }
    }
  }
}

TEST(QueryPlanTest, RejectsBadInput) {
  TinyStore t = MakeStore(1, 2, 3, false, 4, 1);
  BucketQuery q = MakeQuery(t.shape, 2);
  auto msg = [&](const PlanOptions& o, const BucketQuery& qq) {
    auto r = PlanQuery(t.shape, qq, o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(r.status().message());
  };
  EXPECT_NE(msg({Pairing::kReplay, {}, {}}, q).find("replay"),
            std::string::npos);
  EXPECT_NE(msg({Pairing::kMatched, {5}, {}}, q).find("unknown checkpoint 5"),
            std::string::npos);
  EXPECT_NE(msg({Pairing::kMatched, {}, {-1}}, q).find("unknown bucket -1"),
            std::string::npos);
  EXPECT_NE(msg({Pairing::kMatched, {}, {1, 1}}, q).find("twice"),
            std::string::npos);
  BucketQuery nan = q;
  nan.unit[2 * 4 + 3] = std::nanf("");  // checkpoint 0, bucket 2, element 3
  EXPECT_NE(msg({}, nan).find("checkpoint 0, bucket 2, element 3"),
            std::string::npos);
  BucketQuery small = q;
  small.raw.pop_back();
  EXPECT_NE(msg({}, small).find("expected"), std::string::npos);
}

}  // namespace
}  // namespace retrace::scoring

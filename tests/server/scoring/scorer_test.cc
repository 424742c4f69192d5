#include "server/scoring/scorer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "tests/server/scoring/scorer_test_util.h"

namespace retrace::scoring {
namespace {

using testing::RandomQuery;
using testing::TestStoreParams;
using testing::WriteTestStore;

// Brute-force TracIn/ReTrac scores (docs/scoring.md) in double precision,
// reading the stored (already quantized) vectors back through the reader.
std::vector<double> BruteForce(const store::StoreReader& r,
                               const BucketQuery& q, const PlanOptions& o,
                               bool tracin, const std::vector<float>& weights) {
  const int64_t C = r.num_checkpoints(), B = r.num_buckets(), S = r.num_slots();
  const int64_t D = r.dim();
  const kernels::DType dt = r.manifest().spec.dtype;
  auto sel = [](const std::vector<int32_t>& f, int64_t v) {
    return f.empty() || std::find(f.begin(), f.end(), v) != f.end();
  };
  std::vector<double> scores(r.num_samples());
  for (int64_t n = 0; n < r.num_samples(); ++n) {
    auto block = r.Sample(n);
    EXPECT_TRUE(block.ok());
    auto u = [&](int64_t c, int64_t s, int64_t d) -> double {
      const int64_t i = (c * S + s) * D + d;
      switch (dt) {
        case kernels::DType::kF16:
          return kernels::HalfToFloat(
              static_cast<const uint16_t*>(block->vectors)[i]);
        case kernels::DType::kBF16:
          return kernels::Bf16ToFloat(
              static_cast<const uint16_t*>(block->vectors)[i]);
        case kernels::DType::kF32:
          return static_cast<const float*>(block->vectors)[i];
      }
      return 0;
    };
    const auto& qv = tracin ? q.raw : q.unit;
    double total = 0;
    int64_t nb = 0;
    for (int64_t b = 0; b < B; ++b) nb += sel(o.buckets, b);
    for (int64_t c = 0; c < C; ++c) {
      if (!sel(o.checkpoints, c)) continue;
      if (o.pairing == Pairing::kMatched) {
        for (int64_t b = 0; b < B; ++b) {
          if (!sel(o.buckets, b)) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += u(c, b, d) * qv[(c * B + b) * D + d];
          total += weights[c] * (tracin ? block->norms[c * S + b] : 1.0) * dot;
        }
      } else {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          double mean = 0;
          for (int64_t b = 0; b < B; ++b)
            if (sel(o.buckets, b)) mean += qv[(c * B + b) * D + d];
          dot += u(c, B, d) * mean / nb;
        }
        total += weights[c] * (tracin ? block->norms[c * S + B] : 1.0) * dot;
      }
    }
    scores[n] = total;
  }
  return scores;
}

// Checks a ranking against brute-force scores: scores close, order right,
// and any index difference only between (near-)equal scores.
void ExpectRanking(const std::vector<RankedSample>& got,
                   const std::vector<double>& want, int k, bool top) {
  std::vector<int64_t> order(want.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return top ? want[a] > want[b] : want[a] < want[b];
  });
  ASSERT_EQ(got.size(), static_cast<size_t>(k));
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  const double tol = 1e-4 * (1 + scale);
  for (int i = 0; i < k; ++i) {
    SCOPED_TRACE(::testing::Message() << "rank " << i);
    EXPECT_NEAR(got[i].score, want[got[i].index], tol);
    EXPECT_NEAR(got[i].score, want[order[i]], tol);
  }
}

class ScorerTest : public ::testing::Test {
 protected:
  void Open(const TestStoreParams& p, const std::string& name) {
    dir_ = WriteTestStore(p, name);
    auto r = store::StoreReader::Open(dir_);
    ASSERT_TRUE(r.ok()) << r.status();
    reader_ = *std::move(r);
    ScorerOptions o;
    o.device = DeviceChoice::kCpu;
    auto s = Scorer::Create(reader_.get(), o);
    ASSERT_TRUE(s.ok()) << s.status();
    scorer_ = *std::move(s);
  }
  std::string dir_;
  std::unique_ptr<store::StoreReader> reader_;
  std::unique_ptr<Scorer> scorer_;
};

TEST_F(ScorerTest, MatchesBruteForceForEveryPairingAndFilter) {
  for (kernels::DType dt :
       {kernels::DType::kF16, kernels::DType::kBF16, kernels::DType::kF32}) {
    TestStoreParams p;
    p.dtype = dt;
    SCOPED_TRACE(::testing::Message() << "dtype " << kernels::DTypeName(dt));
    Open(p, std::string("scorer_bf_") + kernels::DTypeName(dt));
    const StoreShape& shape = scorer_->shape();
    std::vector<ScoreQuery> batch;
    const std::vector<PlanOptions> plans = {{Pairing::kMatched, {}, {}},
                                            {Pairing::kMatched, {1}, {0, 2}},
                                            {Pairing::kReplay, {}, {}},
                                            {Pairing::kReplay, {0}, {1}}};
    for (size_t i = 0; i < plans.size(); ++i) {
      ScoreQuery q;
      q.vectors = RandomQuery(shape, 100 + i);
      q.plan = plans[i];
      q.k = 5 + int(i) * 7;
      q.opponents = true;
      q.breakdown = (i % 2 == 0);
      batch.push_back(q);
    }
    auto results = scorer_->Score(batch);
    ASSERT_TRUE(results.ok()) << results.status();
    for (size_t i = 0; i < batch.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "query " << i);
      for (bool tracin : {true, false}) {
        SCOPED_TRACE(tracin ? "tracin" : "retrac");
        const auto want = BruteForce(*reader_, batch[i].vectors, batch[i].plan,
                                     tracin, shape.checkpoint_weights);
        const MethodRanking& m =
            tracin ? (*results)[i].tracin : (*results)[i].retrac;
        ExpectRanking(m.proponents, want, batch[i].k, true);
        ExpectRanking(m.opponents, want, batch[i].k, false);
        for (const RankedSample& s : m.proponents) {
          EXPECT_EQ(s.sample_id, 1000 + 7 * s.index);
          EXPECT_EQ(s.label, s.index % 10);
          if (batch[i].breakdown) {
            ASSERT_EQ(s.breakdown.size(),
                      size_t(shape.num_checkpoints * shape.num_slots()));
            double sum =
                std::accumulate(s.breakdown.begin(), s.breakdown.end(), 0.0);
            EXPECT_NEAR(sum, s.score, 1e-4 * (1 + std::fabs(s.score)));
          } else {
            EXPECT_TRUE(s.breakdown.empty());
          }
        }
      }
    }
  }
}

TEST_F(ScorerTest, SameAnswerAloneOrBatched) {
  Open({}, "scorer_batch");
  std::vector<ScoreQuery> batch;
  for (int i = 0; i < 8; ++i) {
    ScoreQuery q;
    q.vectors = RandomQuery(scorer_->shape(), 200 + i);
    q.k = 3 + i;
    batch.push_back(q);
  }
  auto together = scorer_->Score(batch);
  ASSERT_TRUE(together.ok());
  for (int i = 0; i < 8; ++i) {
    auto alone = scorer_->Score({batch[i]});
    ASSERT_TRUE(alone.ok());
    const auto& a = (*alone)[0].retrac.proponents;
    const auto& t = (*together)[i].retrac.proponents;
    ASSERT_EQ(a.size(), t.size());
    for (size_t j = 0; j < a.size(); ++j) {
      EXPECT_EQ(a[j].index, t[j].index);
      EXPECT_EQ(a[j].score, t[j].score);  // bit-identical
    }
  }
}

TEST_F(ScorerTest, RejectsBadRequestsWithClearMessages) {
  TestStoreParams p;
  p.n = 20;
  p.replay = false;
  Open(p, "scorer_errors");
  auto status_of = [&](ScoreQuery q) { return scorer_->Score({q}).status(); };
  ScoreQuery good;
  good.vectors = RandomQuery(scorer_->shape(), 1);
  ASSERT_TRUE(status_of(good).ok());

  auto expect = [](const absl::Status& s, const std::string& needle) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << s;
  };
  ScoreQuery q = good;
  q.k = 0;
  expect(status_of(q), "top_k = 0");
  q.k = 21;
  expect(status_of(q), "store's 20 samples");
  q = good;
  q.vectors.raw.resize(q.vectors.raw.size() - 1);
  expect(status_of(q), "expected");
  q = good;
  q.vectors.unit[5] = INFINITY;
  expect(status_of(q), "non-finite");
  q = good;
  q.plan.checkpoints = {2};
  expect(status_of(q), "unknown checkpoint 2");
  q = good;
  q.plan.buckets = {3};
  expect(status_of(q), "unknown bucket 3");
  q = good;
  q.plan.pairing = Pairing::kReplay;
  expect(status_of(q), "replay slot");
  EXPECT_EQ(scorer_->Score({}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The scorer still answers after every refusal.
  EXPECT_TRUE(status_of(good).ok());
}

TEST(ScorerOptionsTest, MaxBatchIsCheckedAndEnforced) {
  const std::string dir = WriteTestStore({}, "scorer_max_batch");
  auto r = store::StoreReader::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  ScorerOptions o;
  o.device = DeviceChoice::kCpu;
  for (int32_t bad : {0, -1, kernels::kMaxQueries + 1}) {
    o.max_batch = bad;
    const absl::Status s = Scorer::Create(r->get(), o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("max batch"), absl::string_view::npos) << s;
  }
  o.max_batch = 2;
  auto scorer = Scorer::Create(r->get(), o);
  ASSERT_TRUE(scorer.ok()) << scorer.status();
  ScoreQuery q;
  q.vectors = RandomQuery((*scorer)->shape(), 5);
  EXPECT_TRUE((*scorer)->Score({q, q}).ok());
  const absl::Status s = (*scorer)->Score({q, q, q}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("1..2 queries"), absl::string_view::npos) << s;
}

// A RETRACE_CPU_ISA that no CPU scan could run with is refused when the
// scorer starts, naming the variable, instead of by every request.
TEST(ScorerOptionsTest, UnusableCpuIsaEnvironmentFailsAtStart) {
  const std::string dir = WriteTestStore({}, "scorer_cpu_isa");
  auto r = store::StoreReader::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  ScorerOptions o;
  o.device = DeviceChoice::kCpu;
  ASSERT_EQ(setenv(kernels::kCpuIsaEnv, "sse9", 1), 0);
  const absl::Status s = Scorer::Create(r->get(), o).status();
  ASSERT_EQ(unsetenv(kernels::kCpuIsaEnv), 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("RETRACE_CPU_ISA='sse9'"), absl::string_view::npos)
      << s;
  ASSERT_EQ(setenv(kernels::kCpuIsaEnv, "scalar", 1), 0);
  auto scorer = Scorer::Create(r->get(), o);
  ASSERT_EQ(unsetenv(kernels::kCpuIsaEnv), 0);
  ASSERT_TRUE(scorer.ok()) << scorer.status();
}

TEST(DeviceFootprintTest, CheckDeviceFitsNamesEveryPart) {
  DeviceFootprint f;
  f.store_bytes = int64_t{3} << 30;
  f.scratch_bytes = int64_t{1} << 30;
  f.query_bytes = int64_t{1} << 20;
  const int64_t need = f.Total() + kDeviceHeadroomBytes;
  EXPECT_TRUE(CheckDeviceFits(f, need, need * 2).ok());
  const absl::Status s = CheckDeviceFits(f, need - 1, need * 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  for (int64_t bytes : {need, f.store_bytes, f.scratch_bytes, f.query_bytes,
                        need - 1, need * 2}) {
    EXPECT_NE(s.message().find(std::to_string(bytes) + " bytes"),
              absl::string_view::npos)
        << "no " << bytes << " in: " << s.message();
  }
}

TEST(DeviceFootprintTest, SizedForTheLargestRequest) {
  if (!kernels::BuiltWithCuda()) GTEST_SKIP() << "built without CUDA";
  const kernels::StoreLayout layout{kernels::DType::kF16, 2, 4, 64};
  static const char kFake[16] = {};  // not read
  const std::vector<kernels::StoreChunk> chunks = {
      {kFake, reinterpret_cast<const float*>(kFake), 700, 0},
      {kFake, reinterpret_cast<const float*>(kFake), 5300, 700}};
  int64_t previous = 0;
  for (int32_t max_batch : {1, 2, 16, kernels::kMaxQueries}) {
    SCOPED_TRACE("max_batch=" + std::to_string(max_batch));
    auto f = PlanDeviceFootprint(layout, chunks, max_batch,
                                 kernels::CudaScanPath::kAuto);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->store_bytes, 6000 * (8 * 64 * 2 + 8 * 4));
    EXPECT_EQ(f->query_bytes, int64_t{max_batch} * (2 * 512 + 2 * 8) * 4);
    // Every request of up to max_batch queries fits the scratch.
    kernels::ScanOptions worst;
    worst.k = 4096;
    worst.want_bottom = true;
    worst.want_breakdown = true;
    size_t bytes = 0;
    ASSERT_TRUE(
        kernels::CudaScanScratchBytes(layout, chunks, max_batch, worst, &bytes)
            .ok());
    EXPECT_EQ(f->scratch_bytes, static_cast<int64_t>(bytes));
    // At least the [2Q, N] scores and the breakdowns of k = 4096 entries.
    EXPECT_GE(f->scratch_bytes, int64_t{2} * max_batch * 6000 * 4 +
                                    int64_t{2} * max_batch * 2 * 4096 * 8 * 4);
    EXPECT_GT(f->scratch_bytes, previous);
    previous = f->scratch_bytes;
  }
  EXPECT_EQ(
      PlanDeviceFootprint(kernels::StoreLayout{kernels::DType::kF32, 2, 4, 64},
                          chunks, 4, kernels::CudaScanPath::kTensorCore)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(ScorerDeviceTest, CudaRequestWithoutDeviceIsUnavailable) {
  if (kernels::CudaDeviceAvailable()) GTEST_SKIP() << "a device is present";
  const std::string dir = WriteTestStore({}, "scorer_nodevice");
  auto r = store::StoreReader::Open(dir);
  ASSERT_TRUE(r.ok());
  ScorerOptions o;
  o.device = DeviceChoice::kCuda;
  EXPECT_EQ(Scorer::Create(r->get(), o).status().code(),
            absl::StatusCode::kUnavailable);
  o.device = DeviceChoice::kAuto;
  auto s = Scorer::Create(r->get(), o);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)->backend(), kernels::Backend::kCpu);
}

}  // namespace
}  // namespace retrace::scoring

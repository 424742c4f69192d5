// GPU Scorer against the CPU Scorer on the same store (label gpu).
#include <gtest/gtest.h>

#include <cmath>

#include "server/scoring/scorer.h"
#include "tests/server/scoring/scorer_test_util.h"

namespace retrace::scoring {
namespace {

TEST(ScorerGpuTest, MatchesCpu) {
  if (!kernels::CudaDeviceAvailable()) {
    GTEST_SKIP() << "no CUDA device: " << kernels::CudaAvailabilityReason();
  }
  testing::TestStoreParams p;
  p.n = 5000;
  p.dim = 128;
  p.samples_per_shard = 1500;
  const std::string dir = testing::WriteTestStore(p, "scorer_gpu");
  auto r = store::StoreReader::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  ScorerOptions cpu_o, gpu_o;
  cpu_o.device = DeviceChoice::kCpu;
  gpu_o.device = DeviceChoice::kCuda;
  auto cpu = Scorer::Create(r->get(), cpu_o);
  auto gpu = Scorer::Create(r->get(), gpu_o);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_GT((*gpu)->device_bytes(), 0);
  std::vector<ScoreQuery> batch;
  for (int i = 0; i < 16; ++i) {
    ScoreQuery q;
    q.vectors = testing::RandomQuery((*cpu)->shape(), 300 + i);
    q.plan.pairing = i % 2 ? Pairing::kReplay : Pairing::kMatched;
    q.k = 1 + 37 * i;
    q.opponents = true;
    q.breakdown = true;
    batch.push_back(q);
  }
  auto a = (*cpu)->Score(batch);
  auto b = (*gpu)->Score(batch);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  for (size_t i = 0; i < batch.size(); ++i) {
    for (int m = 0; m < 2; ++m) {
      const MethodRanking& x = m ? (*a)[i].retrac : (*a)[i].tracin;
      const MethodRanking& y = m ? (*b)[i].retrac : (*b)[i].tracin;
      ASSERT_EQ(x.proponents.size(), y.proponents.size());
      for (size_t j = 0; j < x.proponents.size(); ++j) {
        SCOPED_TRACE(::testing::Message()
                     << "query " << i << " method " << m << " rank " << j);
        EXPECT_NEAR(x.proponents[j].score, y.proponents[j].score,
                    1e-4f * (1 + std::fabs(x.proponents[j].score)));
      }
    }
  }
}

}  // namespace
}  // namespace retrace::scoring

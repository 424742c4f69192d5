// GPU Scorer against the CPU Scorer on the same store (label gpu).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

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

// Everything the device needs is allocated at Create: a full batch at the
// largest k with opponents and breakdowns runs in it; one query more is
// refused. The tensor-core and fp32 scorers agree within the tensor-core
// tolerance (tests/kernels/scoring_test_util.h).
TEST(ScorerGpuTest, ScratchSizedAtCreateAndPathsAgree) {
  if (!kernels::CudaDeviceAvailable()) {
    GTEST_SKIP() << "no CUDA device: " << kernels::CudaAvailabilityReason();
  }
  testing::TestStoreParams p;
  p.n = 5000;
  p.dim = 96;
  p.samples_per_shard = 1700;
  const std::string dir = testing::WriteTestStore(p, "scorer_gpu_paths");
  auto r = store::StoreReader::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  ScorerOptions fp32_o, tc_o;
  fp32_o.device = tc_o.device = DeviceChoice::kCuda;
  fp32_o.max_batch = tc_o.max_batch = 3;
  fp32_o.cuda_path = kernels::CudaScanPath::kFp32;
  tc_o.cuda_path = kernels::CudaScanPath::kTensorCore;
  auto fp32 = Scorer::Create(r->get(), fp32_o);
  auto tc = Scorer::Create(r->get(), tc_o);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  ASSERT_TRUE(tc.ok()) << tc.status();
  EXPECT_GT((*tc)->device_footprint().scratch_bytes, 0);
  EXPECT_EQ((*tc)->device_footprint().store_bytes, (*tc)->device_bytes());
  std::vector<ScoreQuery> batch;
  for (int i = 0; i < 3; ++i) {
    ScoreQuery q;
    q.vectors = testing::RandomQuery((*tc)->shape(), 400 + i);
    q.k = i == 0 ? 4096 : 1 + 50 * i;
    q.opponents = true;
    q.breakdown = true;
    batch.push_back(q);
  }
  auto a = (*fp32)->Score(batch);
  auto b = (*tc)->Score(batch);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  for (size_t i = 0; i < batch.size(); ++i) {
    for (int m = 0; m < 2; ++m) {
      const MethodRanking& x = m ? (*a)[i].retrac : (*a)[i].tracin;
      const MethodRanking& y = m ? (*b)[i].retrac : (*b)[i].tracin;
      ASSERT_EQ(x.proponents.size(), y.proponents.size());
      ASSERT_EQ(x.opponents.size(), y.opponents.size());
      for (size_t j = 0; j < x.proponents.size(); ++j) {
        SCOPED_TRACE(::testing::Message()
                     << "query " << i << " method " << m << " rank " << j);
        EXPECT_NEAR(x.proponents[j].score, y.proponents[j].score,
                    1e-4f * (1 + std::fabs(x.proponents[j].score)));
        EXPECT_EQ(y.proponents[j].breakdown.size(),
                  x.proponents[j].breakdown.size());
      }
    }
  }
  batch.push_back(batch[1]);
  EXPECT_EQ((*tc)->Score(batch).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::scoring

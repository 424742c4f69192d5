#include "server/model/counter_rng.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/philox.h"

namespace retrace::model {
namespace {

TEST(CounterRngTest, WordsFollowTheDocumentedCounterLayout) {
  RngKey key{0x0123456789abcdefull, RngStream::kBuildNoise, 7, (2u << 16) | 3u,
             1};
  // Word 6 is word 2 of block 1.
  kernels::Philox4x32Block counter{{1u, 7u, (2u << 16) | 3u, (4u << 24) ^ 1u}};
  const auto want = kernels::Philox4x32x10(counter, 0x89abcdefu, 0x01234567u);
  EXPECT_EQ(RandomWord(key, 6), want.v[2]);
}

TEST(CounterRngTest, DeterministicAndKeyed) {
  RngKey a{42, RngStream::kTrainNoise, 10, 3, 0};
  std::vector<float> x(101), y(101), z(101);
  GaussianFill(a, x.data(), 101);
  GaussianFill(a, y.data(), 101);
  EXPECT_EQ(x, y);
  RngKey b = a;
  b.id1 = 4;  // another batch position
  GaussianFill(b, z.data(), 101);
  EXPECT_NE(x, z);
  // A prefix of a longer fill is the shorter fill: value i depends on i only.
  std::vector<float> shorter(37);
  GaussianFill(a, shorter.data(), 37);
  for (int i = 0; i < 37; ++i) EXPECT_EQ(shorter[i], x[i]);
}

TEST(CounterRngTest, GaussianMoments) {
  RngKey key{7, RngStream::kQueryNoise, 0, 0, 0};
  const int n = 200000;
  std::vector<float> x(n);
  GaussianFill(key, x.data(), n);
  double mean = 0, var = 0, kurt = 0;
  for (float v : x) mean += v;
  mean /= n;
  for (float v : x) {
    var += (v - mean) * (v - mean);
    kurt += std::pow(v - mean, 4);
  }
  var /= n;
  kurt /= n * var * var;
  // Standard errors: mean 1/sqrt(n) = 0.0022, variance sqrt(2/n) = 0.0032,
  // kurtosis sqrt(24/n) = 0.011; the bounds are five of them.
  EXPECT_NEAR(mean, 0.0, 0.011);
  EXPECT_NEAR(var, 1.0, 0.016);
  EXPECT_NEAR(kurt, 3.0, 0.055);
}

TEST(CounterRngTest, UniformIntStaysInRangeAndCoversIt) {
  std::vector<int> hits(100, 0);
  for (uint32_t j = 0; j < 20000; ++j) {
    RngKey key{3, RngStream::kBuildTimestep, j, 0, 0};
    const int64_t t = UniformInt(key, 300, 400);
    ASSERT_GE(t, 300);
    ASSERT_LT(t, 400);
    ++hits[t - 300];
  }
  // Expected 200 per value; a count below 120 has probability < 1e-8.
  for (int h : hits) EXPECT_GT(h, 120);
}

}  // namespace
}  // namespace retrace::model

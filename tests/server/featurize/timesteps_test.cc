// Bucket edges, timestep placement and RNG keys of featurization, checked
// against the formulas in docs/featurization.md written out again here.
#include "server/featurize/timesteps.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "server/model/counter_rng.h"

namespace retrace::featurize {
namespace {

TEST(TimestepsTest, EqualBucketEdges) {
  EXPECT_EQ(EqualBucketEdges(10, 1000),
            (std::vector<int64_t>{0, 100, 200, 300, 400, 500, 600, 700, 800,
                                  900, 1000}));
  EXPECT_EQ(EqualBucketEdges(3, 10), (std::vector<int64_t>{0, 3, 6, 10}));
  EXPECT_TRUE(ValidateBucketEdges(EqualBucketEdges(7, 1000), 1000).ok());
}

TEST(TimestepsTest, ValidateBucketEdgesRejectsBadEdges) {
  EXPECT_FALSE(ValidateBucketEdges({0}, 1000).ok());
  EXPECT_FALSE(ValidateBucketEdges({1, 1000}, 1000).ok());
  EXPECT_FALSE(ValidateBucketEdges({0, 999}, 1000).ok());
  EXPECT_FALSE(ValidateBucketEdges({0, 500, 500, 1000}, 1000).ok());
  EXPECT_FALSE(ValidateBucketEdges({0, 600, 500, 1000}, 1000).ok());
  EXPECT_TRUE(ValidateBucketEdges({0, 1, 999, 1000}, 1000).ok());
}

TEST(TimestepsTest, BuildTimestepsLieInsideTheirBucketAndFollowTheKey) {
  const std::vector<int64_t> edges = {0, 1, 7, 100, 650, 1000};
  constexpr uint64_t kSeed = 0x5eed;
  for (int64_t b = 0; b + 1 < static_cast<int64_t>(edges.size()); ++b) {
    int64_t lo_seen = edges[b + 1], hi_seen = edges[b] - 1;
    for (int64_t n = 0; n < 200; ++n) {
      for (int64_t c = 0; c < 3; ++c) {
        for (int64_t j = 0; j < 2; ++j) {
          SCOPED_TRACE(testing::Message()
                       << "b=" << b << " n=" << n << " c=" << c << " j=" << j);
          const int64_t t =
              BuildTimestep(kSeed, n, c, b, j, edges[b], edges[b + 1]);
          ASSERT_GE(t, edges[b]);
          ASSERT_LT(t, edges[b + 1]);
          // The key layout of counter_rng.h: (seed; n, c << 16 | b, j).
          model::RngKey key{
              kSeed, model::RngStream::kBuildTimestep, static_cast<uint32_t>(n),
              static_cast<uint32_t>(c * 65536 + b), static_cast<uint32_t>(j)};
          const uint64_t word = model::RandomWord(key, 0);
          const uint64_t width = static_cast<uint64_t>(edges[b + 1] - edges[b]);
          ASSERT_EQ(t, edges[b] + static_cast<int64_t>((word * width) >> 32));
          lo_seen = std::min(lo_seen, t);
          hi_seen = std::max(hi_seen, t);
        }
      }
    }
    // 1200 uniform draws reach both ends of buckets this narrow or nearly.
    EXPECT_EQ(lo_seen, edges[b]);
    if (edges[b + 1] - edges[b] <= 100) EXPECT_EQ(hi_seen, edges[b + 1] - 1);
  }
}

TEST(TimestepsTest, KeysPackCheckpointBucketAndIndex) {
  const model::RngKey build =
      BuildKey(model::RngStream::kBuildNoise, 9, 123456, 3, 7, 2);
  EXPECT_EQ(build.seed, 9u);
  EXPECT_EQ(build.stream, model::RngStream::kBuildNoise);
  EXPECT_EQ(build.id0, 123456u);
  EXPECT_EQ(build.id1, (3u << 16) | 7u);
  EXPECT_EQ(build.id2, 2u);
  const model::RngKey query = QueryNoiseKey(11, 4, 5, 1, 3);
  EXPECT_EQ(query.seed, 11u);
  EXPECT_EQ(query.stream, model::RngStream::kQueryNoise);
  EXPECT_EQ(query.id0, 4u);
  EXPECT_EQ(query.id1, (5u << 16) | 1u);
  EXPECT_EQ(query.id2, 3u);
}

TEST(TimestepsTest, QueryTimestepsAreCentresOfEqualSubintervals) {
  EXPECT_EQ(QueryTimesteps(0, 100, 1), (std::vector<int64_t>{50}));
  EXPECT_EQ(QueryTimesteps(0, 100, 2), (std::vector<int64_t>{25, 75}));
  EXPECT_EQ(QueryTimesteps(100, 200, 4),
            (std::vector<int64_t>{112, 137, 162, 187}));
  EXPECT_EQ(QueryTimesteps(900, 1000, 3),
            (std::vector<int64_t>{916, 950, 983}));
  // More timesteps than the bucket holds: they repeat but stay inside.
  EXPECT_EQ(QueryTimesteps(5, 7, 4), (std::vector<int64_t>{5, 5, 6, 6}));
  for (int64_t k = 1; k <= 12; ++k) {
    for (int64_t lo : {0, 3, 500}) {
      for (int64_t width : {1, 2, 9, 100, 333}) {
        SCOPED_TRACE(testing::Message()
                     << "lo=" << lo << " width=" << width << " k=" << k);
        const std::vector<int64_t> s = QueryTimesteps(lo, lo + width, k);
        ASSERT_EQ(static_cast<int64_t>(s.size()), k);
        for (int64_t i = 0; i < k; ++i) {
          ASSERT_GE(s[i], lo);
          ASSERT_LT(s[i], lo + width);
          if (i > 0) ASSERT_GE(s[i], s[i - 1]);
          // The centre of sub-interval i, floored.
          const double centre = lo + (i + 0.5) * width / double(k);
          ASSERT_LE(double(s[i]), centre);
          ASSERT_GT(double(s[i]) + 1.0, centre);
        }
      }
    }
  }
}

}  // namespace
}  // namespace retrace::featurize

// Batch order and replay log against the reference in reference_order.h, and
// the replay.bin format.
#include "jobs/batch_order.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "server/model/counter_rng.h"
#include "server/model/replay.h"
#include "tests/jobs/reference_order.h"

namespace retrace::jobs {
namespace {

constexpr uint64_t kSeed = 1234;
constexpr int kTimesteps = 1000;

TEST(EpochPermutationTest, IsAPermutationMatchingTheDefinition) {
  for (int64_t n : {1, 2, 7, 100}) {
    for (int64_t epoch : {0, 1, 5}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " epoch=" << epoch);
      std::vector<int64_t> perm = EpochPermutation(kSeed, epoch, n);
      EXPECT_EQ(perm, testing::ReferencePermutation(kSeed, epoch, n));
      std::vector<int64_t> sorted = perm;
      std::sort(sorted.begin(), sorted.end());
      for (int64_t i = 0; i < n; ++i) EXPECT_EQ(sorted[i], i);
    }
  }
  EXPECT_NE(EpochPermutation(kSeed, 0, 100), EpochPermutation(kSeed, 1, 100));
  EXPECT_NE(EpochPermutation(kSeed, 0, 100),
            EpochPermutation(kSeed + 1, 0, 100));
}

TEST(BatchOrderTest, MatchesReferenceAndDropsTheRemainder) {
  constexpr int64_t kN = 23, kBatch = 5;  // 4 steps per epoch, 3 left out
  auto order = BatchOrder::Create(kSeed, kN, kBatch);
  ASSERT_TRUE(order.ok()) << order.status();
  EXPECT_EQ(order->steps_per_epoch(), 4);
  for (int64_t step = 0; step < 13; ++step) {
    std::vector<int64_t> batch = order->Batch(step);
    ASSERT_EQ(batch.size(), static_cast<size_t>(kBatch));
    for (int64_t p = 0; p < kBatch; ++p) {
      EXPECT_EQ(batch[p], testing::ReferenceSample(kSeed, kN, kBatch, step, p))
          << "step " << step << " position " << p;
    }
  }
  // Within one epoch no sample repeats.
  std::vector<int64_t> epoch;
  for (int64_t step = 4; step < 8; ++step) {
    for (int64_t i : order->Batch(step)) epoch.push_back(i);
  }
  std::sort(epoch.begin(), epoch.end());
  EXPECT_EQ(std::unique(epoch.begin(), epoch.end()), epoch.end());
}

TEST(BatchOrderTest, RejectsBatchLargerThanData) {
  EXPECT_EQ(BatchOrder::Create(kSeed, 4, 5).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BatchOrder::Create(kSeed, 4, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ReplayLogTest, LastStepBeforeEachCheckpointMatchesBruteForce) {
  constexpr int64_t kN = 40, kBatch = 6;
  // The first checkpoint comes before every sample was seen, so some rows
  // are -1; later ones span several epochs.
  const std::vector<int64_t> steps = {2, 9, 20, 21};
  std::vector<int64_t> ids;
  for (int64_t n = 0; n < kN; ++n) ids.push_back(1000 + n);
  auto order = BatchOrder::Create(kSeed, kN, kBatch);
  ASSERT_TRUE(order.ok());
  auto log = BuildReplayLog(kSeed, kTimesteps, *order, steps, ids);
  ASSERT_TRUE(log.ok()) << log.status();
  const auto expected =
      testing::ReferenceReplay(kSeed, kTimesteps, kN, kBatch, steps);
  int64_t unseen_at_first = 0;
  for (size_t c = 0; c < steps.size(); ++c) {
    for (int64_t n = 0; n < kN; ++n) {
      SCOPED_TRACE(::testing::Message() << "c=" << c << " n=" << n);
      const model::ReplayRecord& r = log->At(c, n);
      EXPECT_EQ(r, expected[c][n]);
      if (r.seen()) {
        EXPECT_LT(r.step, steps[c]);
      } else {
        EXPECT_EQ(r.batch_position, -1);
        EXPECT_EQ(r.timestep, -1);
        if (c == 0) ++unseen_at_first;
      }
    }
  }
  EXPECT_EQ(unseen_at_first, kN - 2 * kBatch);
  EXPECT_EQ(log->sample_ids(), ids);
}

TEST(ReplayLogTest, SerializeParseRoundTripAndCorruption) {
  auto order = BatchOrder::Create(kSeed, 10, 3);
  ASSERT_TRUE(order.ok());
  std::vector<int64_t> ids = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
  auto log = BuildReplayLog(kSeed, kTimesteps, *order, {1, 4}, ids);
  ASSERT_TRUE(log.ok());
  const std::string bytes = log->Serialize();
  auto parsed = model::ReplayLog::Parse(bytes, "mem");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->checkpoint_steps(), (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(parsed->sample_ids(), ids);
  EXPECT_EQ(parsed->run_seed(), kSeed);
  EXPECT_EQ(parsed->num_timesteps(), kTimesteps);
  EXPECT_EQ(parsed->batch_size(), 3);
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t n = 0; n < 10; ++n) EXPECT_EQ(parsed->At(c, n), log->At(c, n));
  }
  std::string flipped = bytes;
  flipped[100] ^= 1;
  EXPECT_EQ(model::ReplayLog::Parse(flipped, "mem").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(model::ReplayLog::Parse(bytes.substr(0, bytes.size() - 1), "mem")
                .status()
                .code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(model::ReplayLog::Parse("not a log", "mem").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(model::ReplayLog::Load("/nonexistent-run").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ReplayDrawTest, RegeneratesTheCounterRngDraws) {
  const std::vector<int64_t> shape = {1, 4, 5};
  model::TrainDraw draw = model::ReplayDraw(kSeed, 17, 3, kTimesteps, shape);
  const model::RngKey t_key{kSeed, model::RngStream::kTrainTimestep, 17, 3, 0};
  EXPECT_EQ(draw.timestep, model::UniformInt(t_key, 0, kTimesteps));
  std::vector<float> expected(20);
  model::GaussianFill({kSeed, model::RngStream::kTrainNoise, 17, 3, 0},
                      expected.data(), 20);
  EXPECT_EQ(draw.noise, expected);
  // Neighbouring keys give different draws.
  EXPECT_NE(model::ReplayDraw(kSeed, 17, 4, kTimesteps, shape).noise,
            draw.noise);
  EXPECT_NE(model::ReplayDraw(kSeed, 18, 3, kTimesteps, shape).noise,
            draw.noise);
}

TEST(ReplayDrawTest, LogDrawRefusesUnseenSamples) {
  auto log = model::ReplayLog::Create(kSeed, kTimesteps, 2, {3}, {0, 1});
  ASSERT_TRUE(log.ok());
  log->At(0, 0) = model::ReplayRecord{2, 1, 10};
  auto draw = log->Draw(0, 0, std::vector<int64_t>{2});
  ASSERT_TRUE(draw.ok());
  EXPECT_EQ(draw->noise,
            model::ReplayDraw(kSeed, 2, 1, kTimesteps, std::vector<int64_t>{2})
                .noise);
  EXPECT_EQ(log->Draw(0, 1, std::vector<int64_t>{2}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace retrace::jobs

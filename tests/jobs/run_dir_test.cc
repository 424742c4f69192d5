// run.json, loss.csv, checkpoint schedule and progress formatting.
#include "jobs/run_dir.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "jobs/progress.h"

namespace retrace::jobs {
namespace {

RunManifest SampleManifest() {
  RunManifest m;
  m.config.dataset_spec = "fashion-mnist:train:classes=0";
  m.config.dataset_seed = 3;
  m.config.learning_rate = 2e-4;
  m.config.steps = 10;
  m.config.checkpoint_every = 4;
  m.config.run_seed = 0xfedcba9876543210ull;  // needs all 64 bits
  m.config.model.channel_mults = {1, 2};
  m.config.schedule = model::ScheduleType::kLinear;
  m.config.loss = model::LossType::kL1;
  m.dataset = {40, 1, 28, 28, std::string(64, 'a')};
  m.parameter_count = 12345;
  m.threads = 2;
  m.steps_done = 8;
  m.checkpoints = {{"ckpt-000004.pt", 4, std::string(64, 'b'), 8e-4},
                   {"ckpt-000008.pt", 8, std::string(64, 'c'), 8e-4}};
  m.replay_sha256 = std::string(64, 'd');
  return m;
}

TEST(RunDirTest, CheckpointStepsAndWeights) {
  EXPECT_EQ(CheckpointSteps(600, 200), (std::vector<int64_t>{200, 400, 600}));
  EXPECT_EQ(CheckpointSteps(10, 4), (std::vector<int64_t>{4, 8, 10}));
  EXPECT_EQ(CheckpointSteps(3, 5), (std::vector<int64_t>{3}));
  EXPECT_EQ(CheckpointSteps(1, 1), (std::vector<int64_t>{1}));
  TrainConfig config;
  config.learning_rate = 0.5;
  config.steps = 10;
  config.checkpoint_every = 4;
  EXPECT_DOUBLE_EQ(CheckpointWeight(config, 4), 2.0);
  EXPECT_DOUBLE_EQ(CheckpointWeight(config, 8), 2.0);
  EXPECT_DOUBLE_EQ(CheckpointWeight(config, 10), 1.0);
  EXPECT_EQ(CheckpointFileName(200), "ckpt-000200.pt");
}

TEST(RunDirTest, RunJsonRoundTrip) {
  const RunManifest m = SampleManifest();
  const std::string text = FormatRunJson(m);
  auto parsed = ParseRunJson(text, "run.json");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(FormatRunJson(*parsed), text);
  EXPECT_EQ(parsed->config.run_seed, m.config.run_seed);
  EXPECT_EQ(parsed->config.learning_rate, m.config.learning_rate);
  EXPECT_EQ(parsed->checkpoints.size(), 2u);
  EXPECT_EQ(parsed->checkpoints[1].step, 8);
  EXPECT_DOUBLE_EQ(parsed->checkpoints[1].weight, 8e-4);
  EXPECT_TRUE(CheckSameRun(*parsed, m, "dir").ok());
  EXPECT_EQ(RunIdentityDigest(*parsed), RunIdentityDigest(m));
}

TEST(RunDirTest, CheckSameRunNamesTheDifference) {
  const RunManifest a = SampleManifest();
  RunManifest b = a;
  b.config.learning_rate = 1e-3;
  absl::Status status = CheckSameRun(a, b, "runs/x");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  {
    const std::string message(status.message());
    EXPECT_NE(message.find("runs/x"), std::string::npos) << message;
    EXPECT_NE(message.find("/optimizer/lr"), std::string::npos) << message;
    EXPECT_NE(message.find("0.001"), std::string::npos) << message;
  }
  b = a;
  b.threads = 7;  // progress and threads are not part of the identity
  b.steps_done = 0;
  EXPECT_TRUE(CheckSameRun(a, b, "runs/x").ok());
  b.dataset.sha256 = std::string(64, 'e');
  EXPECT_FALSE(CheckSameRun(a, b, "runs/x").ok());
}

TEST(RunDirTest, ParseRunJsonErrors) {
  EXPECT_EQ(ParseRunJson("{", "r").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseRunJson("{\"format\": \"other\"}", "r").status().code(),
            absl::StatusCode::kInvalidArgument);
  std::string text = FormatRunJson(SampleManifest());
  text.replace(text.find("\"batch_size\""), 12, "\"batch_sizes\"");
  absl::Status status = ParseRunJson(text, "r").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(status.message().find("batch_size"), absl::string_view::npos)
      << status;
}

TEST(RunDirTest, LossLogRoundTripsFloatsExactly) {
  const std::vector<float> losses = {1.0f, 0.123456789f, 3.4028235e38f, 1e-30f,
                                     0.0f};
  auto parsed = ParseLossLog(FormatLossLog(losses), "loss.csv");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, losses);
  EXPECT_EQ(ParseLossLog("step,loss\n1,0.5\n", "l").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseLossLog("step,loss\n0,abc\n", "l").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseLossLog("", "l").status().code(), absl::StatusCode::kDataLoss);
}

TEST(RunDirTest, ValidateTrainConfig) {
  TrainConfig config;
  EXPECT_TRUE(ValidateTrainConfig(config).ok());
  config.batch_size = 0;
  EXPECT_EQ(ValidateTrainConfig(config).code(),
            absl::StatusCode::kInvalidArgument);
  config = {};
  config.learning_rate = -1;
  EXPECT_NE(ValidateTrainConfig(config).message().find("learning_rate"),
            absl::string_view::npos);
}

TEST(ProgressTest, Formatting) {
  EXPECT_EQ(FormatDuration(9.4), "9s");
  EXPECT_EQ(FormatDuration(245), "4m05s");
  EXPECT_EQ(FormatDuration(3723), "1h02m03s");
  EXPECT_EQ(FormatProgress(300, 600, 0.08123, 2.0, 10),
            "[#####.....] 300/600 loss 0.0812 2.00 steps/s ETA 2m30s");
  EXPECT_EQ(FormatProgress(0, 600, 0, 0, 0),
            "0/600 loss 0.0000 -- steps/s ETA --");
}

TEST(ProgressTest, MovingAverageIsBiasCorrected) {
  ProgressReporter progress(nullptr, false, 0, 10, 5.0);
  progress.Update(1, 2.0);
  EXPECT_NEAR(progress.loss_ema(), 2.0, 1e-12);
  progress.Update(2, 2.0);
  EXPECT_NEAR(progress.loss_ema(), 2.0, 1e-12);
}

}  // namespace
}  // namespace retrace::jobs

// Training end to end on a tiny UNet and synthetic images: run directory
// contents, replay log against an independent recomputation, recomputing
// logged losses from the replay log, resume, input errors, and disk errors
// while committing the run's files.
#include "jobs/train.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "common/sha256.h"
#include "server/model/diffusion.h"
#include "server/model/replay.h"
#include "server/model/unet.h"
#include "tests/jobs/reference_order.h"
#include "tests/common/fault_env.h"

namespace retrace::jobs {
namespace {

namespace fs = std::filesystem;

constexpr int kThreads = 2;
constexpr int64_t kNumImages = 40;
constexpr uint64_t kRunSeed = 42;
// The recomputed loss runs the same operations on the same inputs with the
// same thread count; only a different reduction order could change bits.
constexpr double kLossRelTol = 1e-6;

data::ImageSet SyntheticImages(int64_t count = kNumImages, int64_t size = 28) {
  data::ImageSet images;
  images.name = "synthetic";
  images.channels = 1;
  images.height = size;
  images.width = size;
  for (int64_t n = 0; n < count; ++n) {
    images.labels.push_back(static_cast<int32_t>(n % 3));
    for (int64_t y = 0; y < size; ++y) {
      for (int64_t x = 0; x < size; ++x) {
        images.pixels.push_back(static_cast<float>(
            std::sin(0.3 * x + 0.7 * n) * std::cos(0.2 * y - 0.1 * n)));
      }
    }
  }
  return images;
}

TrainConfig TinyConfig() {
  TrainConfig config;
  config.dataset_spec = "synthetic";
  config.model.base_channels = 4;
  config.model.channel_mults = {1, 2};
  config.model.attention = false;
  config.model.norm_groups = 2;
  config.batch_size = 8;
  config.steps = 10;
  config.checkpoint_every = 4;
  config.learning_rate = 1e-3;
  config.run_seed = kRunSeed;
  return config;
}

model::UNetConfig UNetOf(const TrainConfig& config) {
  model::UNetConfig unet;
  unet.base_channels = config.model.base_channels;
  unet.channel_mults = config.model.channel_mults;
  unet.attention = config.model.attention;
  unet.norm_groups = config.model.norm_groups;
  return unet;
}

std::string FreshDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/retrace-train-" + name +
                          "-" + std::to_string(::getpid());
  fs::remove_all(dir);
  return dir;
}

TrainOptions OptionsFor(const std::string& dir) {
  TrainOptions options;
  options.run_dir = dir;
  options.threads = kThreads;
  return options;
}

std::string Slurp(const std::string& path) {
  auto bytes = ReadFile(path);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *bytes : "";
}

std::vector<float> Losses(const std::string& dir) {
  auto losses = ParseLossLog(Slurp(dir + "/" + kLossLogFile), "loss.csv");
  EXPECT_TRUE(losses.ok()) << losses.status();
  return losses.ok() ? *losses : std::vector<float>{};
}

TEST(TrainTest, WritesRunDirectoryWithChecksumsAndWeights) {
  const std::string dir = FreshDir("layout");
  const data::ImageSet images = SyntheticImages();
  std::vector<int64_t> ids;
  for (int64_t n = 0; n < kNumImages; ++n) ids.push_back(500 + 3 * n);
  const TrainConfig config = TinyConfig();
  auto result = Train(config, images, ids, OptionsFor(dir));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->complete);
  EXPECT_EQ(result->steps_done, 10);
  std::printf("tiny UNet: %.1f steps/s at batch %lld on %d threads\n",
              result->steps_per_second,
              static_cast<long long>(config.batch_size), kThreads);

  // LoadRun re-hashes every listed file.
  auto run = LoadRun(dir, /*verify_checksums=*/true);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_TRUE(run->complete);
  EXPECT_EQ(run->steps_done, 10);
  EXPECT_EQ(run->threads, kThreads);
  EXPECT_GT(run->parameter_count, 0);
  EXPECT_EQ(run->dataset.num_samples, kNumImages);
  ASSERT_EQ(run->checkpoints.size(), 3u);
  const int64_t expected_steps[] = {4, 8, 10};
  const double expected_weights[] = {4e-3, 4e-3, 2e-3};
  for (size_t c = 0; c < 3; ++c) {
    const CheckpointInfo& info = run->checkpoints[c];
    EXPECT_EQ(info.step, expected_steps[c]);
    EXPECT_EQ(info.file, CheckpointFileName(expected_steps[c]));
    EXPECT_NEAR(info.weight, expected_weights[c], 1e-15);
    // Independent hash of the file on disk.
    std::ifstream in(dir + "/" + info.file, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    EXPECT_EQ(info.sha256, Sha256Hex(bytes.str()));
    // The checkpoint loads into the configured UNet.
    auto net = model::UNetModel::Create(UNetOf(config), 0);
    ASSERT_TRUE(net.ok());
    EXPECT_TRUE((*net)->Load(dir + "/" + info.file).ok());
  }
  EXPECT_EQ(Sha256Hex(Slurp(dir + "/replay.bin")), run->replay_sha256);

  const std::vector<float> losses = Losses(dir);
  ASSERT_EQ(losses.size(), 10u);
  for (float loss : losses) {
    EXPECT_TRUE(std::isfinite(loss));
    EXPECT_GT(loss, 0.0f);
  }
  // No temporary files are left behind.
  for (const auto& entry : fs::directory_iterator(dir)) {
    EXPECT_EQ(entry.path().string().find(kTempSuffix), std::string::npos)
        << entry.path();
  }

  auto log = model::ReplayLog::Load(dir);
  ASSERT_TRUE(log.ok()) << log.status();
  EXPECT_EQ(log->sample_ids(), ids);
  EXPECT_EQ(log->checkpoint_steps(), (std::vector<int64_t>{4, 8, 10}));
  const auto expected =
      testing::ReferenceReplay(kRunSeed, config.num_timesteps, kNumImages,
                               config.batch_size, log->checkpoint_steps());
  int64_t unseen = 0;
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t n = 0; n < kNumImages; ++n) {
      SCOPED_TRACE(::testing::Message() << "c=" << c << " n=" << n);
      EXPECT_EQ(log->At(c, n), expected[c][n]);
      unseen += log->At(c, n).seen() ? 0 : 1;
    }
  }
  // Checkpoint 0 (4 steps of 8 of 40 samples) leaves 8 samples unseen.
  EXPECT_EQ(unseen, 8);
}

// The test: with a checkpoint after every step, the weights in use at
// step s are those of checkpoint s (step 0: the initialization), and the
// replay log of checkpoint s + 1 names exactly step s's batch. Rebuilding that
// batch from the log and the counter RNG reproduces the logged loss.
TEST(TrainTest, LoggedLossesAreRecomputedFromTheReplayLog) {
  const std::string dir = FreshDir("recompute");
  const data::ImageSet images = SyntheticImages();
  TrainConfig config = TinyConfig();
  config.steps = 7;  // 5 steps per epoch: steps 5 and 6 are in epoch 1
  config.checkpoint_every = 1;
  ASSERT_TRUE(Train(config, images, {}, OptionsFor(dir)).ok());
  const std::vector<float> losses = Losses(dir);
  ASSERT_EQ(losses.size(), 7u);
  auto log = model::ReplayLog::Load(dir);
  ASSERT_TRUE(log.ok()) << log.status();
  auto schedule =
      model::NoiseSchedule::Create(config.schedule, config.num_timesteps);
  ASSERT_TRUE(schedule.ok());
  at::set_num_threads(kThreads);

  for (int64_t step = 0; step + 1 < config.steps; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    auto net = model::UNetModel::Create(UNetOf(config), kRunSeed);
    ASSERT_TRUE(net.ok());
    if (step > 0) {
      ASSERT_TRUE((*net)->Load(dir + "/" + CheckpointFileName(step)).ok());
    }
    (*net)->SetTraining(true);
    const int64_t c = step;  // checkpoint index of step + 1
    ASSERT_EQ(log->checkpoint_steps()[c], step + 1);
    std::map<int32_t, int64_t> by_position;
    for (int64_t n = 0; n < kNumImages; ++n) {
      if (log->At(c, n).step == step)
        by_position[log->At(c, n).batch_position] = n;
    }
    ASSERT_EQ(static_cast<int64_t>(by_position.size()), config.batch_size);
    const int64_t batch = config.batch_size;
    torch::Tensor x = torch::empty({batch, 1, 28, 28});
    torch::Tensor eps = torch::empty({batch, 1, 28, 28});
    torch::Tensor t = torch::empty({batch}, torch::kLong);
    for (const auto& [position, n] : by_position) {
      auto draw = log->Draw(c, n, std::vector<int64_t>{1, 28, 28});
      ASSERT_TRUE(draw.ok()) << draw.status();
      EXPECT_EQ(draw->timestep, log->At(c, n).timestep);
      x[position].copy_(torch::from_blob(
          const_cast<float*>(images.Image(n).data()), {1, 28, 28}));
      eps[position].copy_(torch::from_blob(draw->noise.data(), {1, 28, 28}));
      t[position] = draw->timestep;
    }
    auto per_example =
        model::DiffusionLoss(**net, *schedule, config.loss, x, t, eps);
    ASSERT_TRUE(per_example.ok()) << per_example.status();
    const float recomputed = per_example->mean().item<float>();
    EXPECT_NEAR(recomputed, losses[step], kLossRelTol * losses[step])
        << "recomputed " << recomputed << " logged " << losses[step];
  }
}

TEST(TrainTest, ResumeGivesByteIdenticalCheckpoints) {
  const data::ImageSet images = SyntheticImages();
  const TrainConfig config = TinyConfig();  // checkpoints at 4, 8, 10
  const std::string straight = FreshDir("straight");
  ASSERT_TRUE(Train(config, images, {}, OptionsFor(straight)).ok());

  const std::string resumed = FreshDir("resumed");
  TrainOptions interrupted = OptionsFor(resumed);
  interrupted.should_stop = [](int64_t done) { return done == 6; };
  auto first = Train(config, images, {}, interrupted);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->complete);
  EXPECT_EQ(first->steps_done, 6);
  auto partial = LoadRun(resumed);
  ASSERT_TRUE(partial.ok()) << partial.status();
  EXPECT_EQ(partial->steps_done, 6);
  EXPECT_FALSE(partial->complete);
  EXPECT_EQ(partial->checkpoints.size(), 1u);
  EXPECT_FALSE(fs::exists(resumed + "/" + CheckpointFileName(8)));

  TrainOptions resume = OptionsFor(resumed);
  resume.resume = true;
  auto second = Train(config, images, {}, resume);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->complete);
  EXPECT_EQ(second->start_step, 6);

  for (int64_t step : {4, 8, 10}) {
    SCOPED_TRACE(::testing::Message() << "checkpoint " << step);
    const std::string name = "/" + CheckpointFileName(step);
    EXPECT_EQ(Sha256Hex(Slurp(straight + name)),
              Sha256Hex(Slurp(resumed + name)));
  }
  EXPECT_EQ(Slurp(straight + "/replay.bin"), Slurp(resumed + "/replay.bin"));
  EXPECT_EQ(Slurp(straight + "/loss.csv"), Slurp(resumed + "/loss.csv"));
  EXPECT_EQ(Slurp(straight + "/run.json"), Slurp(resumed + "/run.json"));

  // Resuming a complete run trains nothing.
  auto third = Train(config, images, {}, resume);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_TRUE(third->complete);
  EXPECT_EQ(third->start_step, 10);
}

// A disk error while the run directory is being updated after step 4 (the
// second checkpoint) is reported naming the operation and the file; the
// state saved after step 2 stays usable (run.json, the first checkpoint,
// train-state.pt) and a resume ends with the bytes of an uninterrupted run.
TEST(TrainTest, DiskErrorsWhileSavingKeepThePreviousState) {
  using retrace::testing::FaultEnv;
  const data::ImageSet images = SyntheticImages();
  TrainConfig config = TinyConfig();
  config.steps = 4;
  config.checkpoint_every = 2;  // saves after steps 2 and 4
  const std::string straight = FreshDir("fault-straight");
  ASSERT_TRUE(Train(config, images, {}, OptionsFor(straight)).ok());
  const std::string first_checkpoint = "/" + CheckpointFileName(2);
  const std::string second_checkpoint = "/" + CheckpointFileName(4);

  struct Case {
    const char* file;  // part of the failing call's path ("": any)
    FaultEnv::Op op;
    int64_t n;  // among the calls of op on that file
    int err;
    bool short_write;
    const char* message;  // expected in the error, after the run directory
  };
  const Case cases[] = {
      {"ckpt-000004.pt", FaultEnv::Op::kSync, 0, EIO, false,
       "/ckpt-000004.pt.tmp': Input/output error (EIO)"},
      {"ckpt-000004.pt", FaultEnv::Op::kRename, 0, EIO, false,
       "/ckpt-000004.pt.tmp' of '"},
      {"train-state.pt", FaultEnv::Op::kSync, 1, EIO, false,
       "/train-state.pt.tmp': Input/output error (EIO)"},
      {"train-state.pt", FaultEnv::Op::kRename, 1, ENOSPC, false,
       "/train-state.pt.tmp' of '"},
      {"run.json", FaultEnv::Op::kSync, 2, EIO, false,
       "/run.json.tmp': Input/output error (EIO)"},
      {"run.json", FaultEnv::Op::kRename, 2, EIO, false, "/run.json.tmp' of '"},
      {"loss.csv", FaultEnv::Op::kWrite, 1, ENOSPC, true,
       "/loss.csv.tmp': No space left on device (ENOSPC)"},
      // The directory fsync after ckpt-000004.pt's rename (the seventh).
      {"", FaultEnv::Op::kSyncDir, 6, EIO, false, "': Input/output error"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << FaultEnv::OpName(c.op) << " call "
                                      << c.n << " on '" << c.file << "' fails");
    const std::string dir = FreshDir("fault");
    FaultEnv env;
    env.FailNthOn(c.file, c.op, c.n, c.err, c.short_write);
    TrainOptions options = OptionsFor(dir);
    options.env = &env;
    absl::StatusOr<TrainResult> failed = Train(config, images, {}, options);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().code(), c.err == ENOSPC
                                          ? absl::StatusCode::kResourceExhausted
                                          : absl::StatusCode::kInternal);
    EXPECT_NE(failed.status().message().find(
                  std::string(FaultEnv::OpName(c.op)) +
                  (c.op == FaultEnv::Op::kRename ? " from '" : " of '") + dir),
              absl::string_view::npos)
        << failed.status();
    EXPECT_NE(failed.status().message().find(c.message),
              absl::string_view::npos)
        << failed.status();

    // What readers trust is the state after step 2.
    absl::StatusOr<RunManifest> run = LoadRun(dir, /*verify_checksums=*/false);
    ASSERT_TRUE(run.ok()) << run.status();
    EXPECT_EQ(run->steps_done, 2);
    ASSERT_EQ(run->checkpoints.size(), 1u);
    EXPECT_EQ(Slurp(dir + first_checkpoint),
              Slurp(straight + first_checkpoint));
    EXPECT_EQ(run->checkpoints[0].sha256,
              Sha256Hex(Slurp(dir + first_checkpoint)));

    TrainOptions resume = OptionsFor(dir);
    resume.resume = true;
    absl::StatusOr<TrainResult> resumed = Train(config, images, {}, resume);
    ASSERT_TRUE(resumed.ok()) << resumed.status();
    EXPECT_TRUE(resumed->complete);
    for (const std::string name :
         {first_checkpoint, second_checkpoint, std::string("/replay.bin"),
          std::string("/loss.csv"), std::string("/run.json"),
          std::string("/model.toml")}) {
      EXPECT_EQ(Slurp(dir + name), Slurp(straight + name)) << name;
    }
    ASSERT_TRUE(LoadRun(dir, /*verify_checksums=*/true).ok());
    if (HasFailure()) return;
  }
}

TEST(TrainTest, RefusesAnotherRunOrAnImplicitResume) {
  const data::ImageSet images = SyntheticImages();
  TrainConfig config = TinyConfig();
  config.steps = 2;
  const std::string dir = FreshDir("conflict");
  ASSERT_TRUE(Train(config, images, {}, OptionsFor(dir)).ok());

  auto again = Train(config, images, {}, OptionsFor(dir));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("--resume"), absl::string_view::npos)
      << again.status();

  TrainConfig other = config;
  other.learning_rate = 2e-3;
  for (bool resume : {false, true}) {
    TrainOptions options = OptionsFor(dir);
    options.resume = resume;
    auto status = Train(other, images, {}, options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_NE(status.message().find("lr"), absl::string_view::npos) << status;
  }
  // Different data with the same config is a different run too.
  TrainOptions options = OptionsFor(dir);
  options.resume = true;
  auto status =
      Train(config, SyntheticImages(kNumImages + 1), {}, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
}

TEST(TrainTest, BadInputs) {
  const data::ImageSet images = SyntheticImages();
  TrainConfig config = TinyConfig();

  // A run directory under a regular file cannot be created.
  const std::string file = FreshDir("file");
  std::ofstream(file) << "x";
  auto status = Train(config, images, {}, OptionsFor(file + "/run")).status();
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find(file), absl::string_view::npos) << status;

  config.batch_size = kNumImages + 1;
  status = Train(config, images, {}, OptionsFor(FreshDir("big"))).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  config = TinyConfig();
  data::ImageSet odd = SyntheticImages(10, 28);
  odd.width = 14;
  odd.height = 56;
  status = Train(config, odd, {}, OptionsFor(FreshDir("odd"))).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  std::vector<int64_t> ids = {1, 2};
  status = Train(config, images, ids, OptionsFor(FreshDir("ids"))).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  config.model.norm_groups = 3;  // does not divide 4 channels
  status = Train(config, images, {}, OptionsFor(FreshDir("groups"))).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  config = TinyConfig();
  config.learning_rate = 0;
  status = Train(config, images, {}, OptionsFor(FreshDir("lr"))).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
}

}  // namespace
}  // namespace retrace::jobs

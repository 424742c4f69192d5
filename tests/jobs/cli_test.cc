// retrace-batch's command line: help, usage errors (exit 2), failures
// (exit 1) and a tiny training run on Fashion-MNIST when it is installed.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "jobs/run_dir.h"
#include "server/model/device.h"

namespace retrace::jobs {
namespace {

namespace fs = std::filesystem;

struct Outcome {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

Outcome RunBatch(const std::string& args) {
  const std::string log = ::testing::TempDir() + "/retrace-batch-cli-" +
                          std::to_string(::getpid()) + ".log";
  const std::string command =
      std::string(RETRACE_BATCH_BINARY) + " " + args + " > " + log + " 2>&1";
  const int status = std::system(command.c_str());
  Outcome outcome;
  outcome.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  outcome.output = text.str();
  return outcome;
}

std::string TempRunDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/retrace-batch-cli-" + name +
                          "-" + std::to_string(::getpid());
  fs::remove_all(dir);
  return dir;
}

TEST(RetraceBatchCliTest, HelpExitsZero) {
  Outcome out = RunBatch("train --help");
  EXPECT_EQ(out.exit_code, 0) << out.output;
  EXPECT_NE(out.output.find("--run-dir"), std::string::npos) << out.output;
  EXPECT_NE(out.output.find("--resume"), std::string::npos) << out.output;
  EXPECT_EQ(RunBatch("--help").exit_code, 0);
}

TEST(RetraceBatchCliTest, UsageErrorsExitTwo) {
  const std::string dir = TempRunDir("usage");
  for (const std::string args :
       {std::string(""), std::string("frobnicate"),
        "train --run-dir " + dir,  // --data missing
        "train --data mnist --run-dir " + dir + " --steps 0",
        "train --data mnist --run-dir " + dir + " --schedule square",
        "train --data mnist --run-dir " + dir + " --channel-mults 1,x",
        "train --data no-such-source --run-dir " + dir}) {
    SCOPED_TRACE(args);
    Outcome out = RunBatch(args);
    EXPECT_EQ(out.exit_code, 2) << out.output;
    EXPECT_FALSE(out.output.empty());
  }
  EXPECT_FALSE(fs::exists(dir));
}

TEST(RetraceBatchCliTest, MissingDataExitsOneWithMessage) {
  Outcome out = RunBatch(
      "train --data folder:path=/nonexistent-retrace-data "
      "--run-dir " +
      TempRunDir("missing"));
  EXPECT_EQ(out.exit_code, 1) << out.output;
  EXPECT_NE(out.output.find("/nonexistent-retrace-data"), std::string::npos)
      << out.output;
}

// --device: auto|cpu|cuda on train and build-store; another name is a usage
// error, and cuda where it cannot run fails before any data or model is read,
// naming why.
TEST(RetraceBatchCliTest, DeviceFlag) {
  for (const char* command : {"train", "build-store"}) {
    Outcome help = RunBatch(std::string(command) + " --help");
    EXPECT_NE(help.output.find("--device"), std::string::npos) << help.output;
  }
  const std::string dir = TempRunDir("device");
  Outcome bad =
      RunBatch("train --data mnist --run-dir " + dir + " --device tpu");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("tpu"), std::string::npos) << bad.output;
  if (model::TorchBuiltWithCuda() && model::CudaDeviceCount() > 0) {
    GTEST_SKIP() << "a CUDA device is usable here: --device cuda runs";
  }
  const std::string why =
      model::TorchBuiltWithCuda() ? "no CUDA device" : "built without CUDA";
  for (const std::string args :
       {"train --data folder:path=/nonexistent-retrace-data --run-dir " + dir +
            " --device cuda",
        "build-store --model /nonexistent-retrace-model --out " + dir +
            " --device cuda"}) {
    SCOPED_TRACE(args);
    Outcome out = RunBatch(args);
    EXPECT_EQ(out.exit_code, 1) << out.output;
    EXPECT_NE(out.output.find("FAILED_PRECONDITION"), std::string::npos)
        << out.output;
    EXPECT_NE(out.output.find(why), std::string::npos) << out.output;
    EXPECT_EQ(out.output.find("nonexistent"), std::string::npos)
        << "the device is checked before the data: " << out.output;
  }
  EXPECT_FALSE(fs::exists(dir));
}

TEST(RetraceBatchCliTest, TrainsOnFashionMnistAndResumes) {
  if (!fs::exists(
          "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")) {
    GTEST_SKIP()
        << "Fashion-MNIST (Debian dataset-fashion-mnist) not installed";
  }
  const std::string dir = TempRunDir("train");
  const std::string args =
      "train --data fashion-mnist:test:classes=0:limit=24 --run-dir " + dir +
      " --steps 3 --batch-size 8 --checkpoint-every 2 --base-channels 4"
      " --norm-groups 2 --channel-mults 1,2 --no-attention --threads 1 --quiet";
  Outcome out = RunBatch(args);
  ASSERT_EQ(out.exit_code, 0) << out.output;
  auto run = LoadRun(dir);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_TRUE(run->complete);
  EXPECT_EQ(run->checkpoints.size(), 2u);
  EXPECT_EQ(run->dataset.num_samples, 24);
  EXPECT_EQ(run->config.dataset_spec, "fashion-mnist:test:classes=0:limit=24");

  out = RunBatch(args);
  EXPECT_EQ(out.exit_code, 1) << out.output;
  EXPECT_NE(out.output.find("--resume"), std::string::npos) << out.output;
  out = RunBatch(args + " --resume");
  EXPECT_EQ(out.exit_code, 0) << out.output;
}

}  // namespace
}  // namespace retrace::jobs

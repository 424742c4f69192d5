// The device choice: parsing, what `auto` resolves to, `cuda` refused with
// its reason where it cannot run, and a model moved to the CPU unchanged.
// On a CUDA machine the refusal case skips; tests labelled gpu
// (tests/server/featurize/featurizer_gpu_test.cc) cover the device itself.
#include "server/model/device.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "server/model/unet.h"

namespace retrace::model {
namespace {

bool CudaUsable() { return TorchBuiltWithCuda() && CudaDeviceCount() > 0; }

TEST(DeviceTest, ParsesTheThreeNamesAndRefusesOthers) {
  for (DeviceChoice c :
       {DeviceChoice::kAuto, DeviceChoice::kCpu, DeviceChoice::kCuda}) {
    auto parsed = ParseDeviceChoice(DeviceChoiceName(c));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, c);
  }
  for (const char* bad : {"", "gpu", "CUDA", "cuda:1"}) {
    auto parsed = ParseDeviceChoice(bad);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
    EXPECT_NE(parsed.status().message().find(std::string("'") + bad + "'"),
              std::string::npos)
        << parsed.status();
  }
}

TEST(DeviceTest, CpuIsAlwaysCpuAndAutoFollowsTheMachine) {
  std::printf("LibTorch built with CUDA: %s, CUDA devices: %d\n",
              TorchBuiltWithCuda() ? "yes" : "no", CudaDeviceCount());
  auto cpu = ResolveDevice(DeviceChoice::kCpu);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ(*cpu, DeviceChoice::kCpu);
  auto automatic = ResolveDevice(DeviceChoice::kAuto);
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ(*automatic,
            CudaUsable() ? DeviceChoice::kCuda : DeviceChoice::kCpu);
  if (!TorchBuiltWithCuda()) EXPECT_EQ(CudaDeviceCount(), 0);
}

TEST(DeviceTest, CudaWithoutCudaIsRefusedWithTheReason) {
  if (CudaUsable()) GTEST_SKIP() << "a CUDA device is usable here";
  auto cuda = ResolveDevice(DeviceChoice::kCuda);
  ASSERT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition)
      << cuda.status();
  const std::string why =
      TorchBuiltWithCuda() ? "no CUDA device" : "built without CUDA";
  EXPECT_NE(cuda.status().message().find(why), std::string::npos)
      << cuda.status();
}

TEST(DeviceTest, MoveModelToNeedsAResolvedDevice) {
  UNetConfig config;
  config.base_channels = 4;
  config.channel_mults = {1, 2};
  config.attention = false;
  config.norm_groups = 2;
  auto net = UNetModel::Create(config, 3);
  ASSERT_TRUE(net.ok()) << net.status();
  EXPECT_EQ(MoveModelTo(**net, DeviceChoice::kAuto).code(),
            absl::StatusCode::kInvalidArgument);
  const at::Tensor x = at::linspace(-1, 1, 2 * 28 * 28).reshape({2, 1, 28, 28});
  const at::Tensor t = at::tensor(std::vector<int64_t>{5, 900}, at::kLong);
  auto before = (*net)->Forward(x, t);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE(MoveModelTo(**net, DeviceChoice::kCpu).ok());
  EXPECT_TRUE((*net)->device().is_cpu());
  auto after = (*net)->Forward(x, t);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(at::equal(*before, *after));
}

}  // namespace
}  // namespace retrace::model

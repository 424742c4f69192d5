#include "kernels/device.h"

#include <gtest/gtest.h>

namespace retrace::kernels {
namespace {

TEST(DeviceTest, DefaultBackendFollowsAvailability) {
  EXPECT_EQ(DefaultBackend(),
            CudaDeviceAvailable() ? Backend::kCuda : Backend::kCpu);
  EXPECT_FALSE(CudaAvailabilityReason().empty());
  if (!BuiltWithCuda()) EXPECT_FALSE(CudaDeviceAvailable());
}

TEST(DeviceTest, CpuThreadsPositive) { EXPECT_GE(CpuThreads(), 1); }

TEST(DeviceTest, KernelStatusToString) {
  EXPECT_EQ(KernelStatus::Ok().ToString(), "OK");
  EXPECT_EQ(KernelStatus::InvalidArgument("k = 0").ToString(),
            "INVALID_ARGUMENT: k = 0");
}

}  // namespace
}  // namespace retrace::kernels

#include "server/core/kernel_status.h"

#include <gtest/gtest.h>

namespace retrace {
namespace {

TEST(KernelStatusTest, EachKernelCodeMapsToItsStatusCode) {
  using kernels::KernelStatus;
  EXPECT_TRUE(FromKernelStatus(KernelStatus::Ok()).ok());
  EXPECT_EQ(FromKernelStatus(KernelStatus::InvalidArgument("x")).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromKernelStatus(KernelStatus::OutOfMemory("x")).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(FromKernelStatus(KernelStatus::Unavailable("x")).code(),
            absl::StatusCode::kUnavailable);
  absl::Status dev = FromKernelStatus(KernelStatus::DeviceError("launch"));
  EXPECT_EQ(dev.code(), absl::StatusCode::kInternal);
  EXPECT_NE(dev.message().find("launch"), absl::string_view::npos);
}

absl::Status FailsInAKernel() {
  RETURN_IF_KERNEL_ERROR(kernels::KernelStatus::OutOfMemory("scratch"));
  return absl::OkStatus();
}

TEST(KernelStatusTest, ReturnIfKernelErrorReturnsTheConvertedStatus) {
  const absl::Status status = FailsInAKernel();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(status.message(), "scratch");
}

}  // namespace
}  // namespace retrace

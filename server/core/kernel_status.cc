#include "server/core/kernel_status.h"

#include "absl/strings/str_cat.h"

namespace retrace {

absl::Status FromKernelStatus(const kernels::KernelStatus& status) {
  using kernels::KernelCode;
  switch (status.code()) {
    case KernelCode::kOk:
      return absl::OkStatus();
    case KernelCode::kInvalidArgument:
      return absl::InvalidArgumentError(status.message());
    case KernelCode::kOutOfMemory:
      return absl::ResourceExhaustedError(status.message());
    case KernelCode::kUnavailable:
      return absl::UnavailableError(status.message());
    case KernelCode::kDeviceError:
      return absl::InternalError(
          absl::StrCat("device error: ", status.message()));
    case KernelCode::kInternal:
      return absl::InternalError(status.message());
  }
  return absl::InternalError(status.message());
}

}  // namespace retrace

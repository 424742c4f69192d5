// The one place where a kernel's KernelStatus becomes an absl::Status. Kept
// out of common/status.h so that code without kernels (the CLI) does not
// link them.
#ifndef RETRACE_SERVER_CORE_KERNEL_STATUS_H_
#define RETRACE_SERVER_CORE_KERNEL_STATUS_H_

#include "absl/status/status.h"
#include "common/status.h"
#include "kernels/kernel_status.h"

namespace retrace {

// kInvalidArgument -> INVALID_ARGUMENT, kOutOfMemory -> RESOURCE_EXHAUSTED,
// kUnavailable -> UNAVAILABLE, kDeviceError/kInternal -> INTERNAL.
absl::Status FromKernelStatus(const kernels::KernelStatus& status);

}  // namespace retrace

// Converts a KernelStatus and returns it when it is not ok.
#define RETURN_IF_KERNEL_ERROR(expr) \
  RETURN_IF_ERROR(::retrace::FromKernelStatus(expr))

#endif  // RETRACE_SERVER_CORE_KERNEL_STATUS_H_

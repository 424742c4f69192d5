// Error values of the kernel layer.
//
// kernels/ depends on nothing but the C++ standard library and (optionally) the
// CUDA runtime, so that it builds on machines without abseil, gRPC or LibTorch.
// server/core converts a KernelStatus into an absl::Status at its boundary
// (retrace::FromKernelStatus).
#ifndef RETRACE_KERNELS_KERNEL_STATUS_H_
#define RETRACE_KERNELS_KERNEL_STATUS_H_

#include <string>
#include <utility>

namespace retrace::kernels {

enum class KernelCode {
  kOk = 0,
  kInvalidArgument,  // the caller's arguments are wrong (shape, range, null)
  kOutOfMemory,      // host or device allocation failed
  kDeviceError,      // a CUDA call or launch failed
  kUnavailable,      // the requested backend is not present (no device)
  kInternal,         // a broken internal invariant
};

class KernelStatus {
 public:
  KernelStatus() = default;
  KernelStatus(KernelCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static KernelStatus Ok() { return KernelStatus(); }
  static KernelStatus InvalidArgument(std::string m) {
    return KernelStatus(KernelCode::kInvalidArgument, std::move(m));
  }
  static KernelStatus OutOfMemory(std::string m) {
    return KernelStatus(KernelCode::kOutOfMemory, std::move(m));
  }
  static KernelStatus DeviceError(std::string m) {
    return KernelStatus(KernelCode::kDeviceError, std::move(m));
  }
  static KernelStatus Unavailable(std::string m) {
    return KernelStatus(KernelCode::kUnavailable, std::move(m));
  }
  static KernelStatus Internal(std::string m) {
    return KernelStatus(KernelCode::kInternal, std::move(m));
  }

  bool ok() const { return code_ == KernelCode::kOk; }
  KernelCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  KernelCode code_ = KernelCode::kOk;
  std::string message_;
};

}  // namespace retrace::kernels

// Returns early from the enclosing function when `expr` is not ok.
#define RETRACE_KERNEL_RETURN_IF_ERROR(expr)               \
  do {                                                     \
    ::retrace::kernels::KernelStatus _retrace_ks = (expr); \
    if (!_retrace_ks.ok()) return _retrace_ks;             \
  } while (0)

#endif  // RETRACE_KERNELS_KERNEL_STATUS_H_

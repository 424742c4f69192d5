#include "server/model/device.h"

#include <ATen/Context.h>
#include <c10/core/Device.h>
#include <torch/cuda.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/model/diffusion_model.h"
#include "server/model/torch_status.h"

namespace retrace::model {

const char* DeviceChoiceName(DeviceChoice choice) {
  switch (choice) {
    case DeviceChoice::kAuto:
      return "auto";
    case DeviceChoice::kCpu:
      return "cpu";
    case DeviceChoice::kCuda:
      return "cuda";
  }
  return "unknown";
}

absl::StatusOr<DeviceChoice> ParseDeviceChoice(absl::string_view text) {
  if (text == "auto") return DeviceChoice::kAuto;
  if (text == "cpu") return DeviceChoice::kCpu;
  if (text == "cuda") return DeviceChoice::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("device must be auto, cpu or cuda, got '", text, "'"));
}

bool TorchBuiltWithCuda() {
#if defined(RETRACE_TORCH_HAS_CUDA) && RETRACE_TORCH_HAS_CUDA
  return true;
#else
  return false;
#endif
}

int CudaDeviceCount() {
  if (!TorchBuiltWithCuda()) return 0;
  absl::StatusOr<int> count = internal::CallTorch(
      "counting CUDA devices", [&]() -> absl::StatusOr<int> {
        return static_cast<int>(torch::cuda::device_count());
      });
  return count.ok() ? *count : 0;
}

absl::StatusOr<DeviceChoice> ResolveDevice(DeviceChoice choice) {
  if (choice == DeviceChoice::kCpu) return DeviceChoice::kCpu;
  if (!TorchBuiltWithCuda()) {
    if (choice == DeviceChoice::kAuto) return DeviceChoice::kCpu;
    return absl::FailedPreconditionError(
        "device cuda requested, but the linked LibTorch was built without "
        "CUDA (build against a LibTorch with CUDA, e.g. "
        "-DCMAKE_PREFIX_PATH=<torch.utils.cmake_prefix_path>; "
        "docs/operations.md), or choose the device cpu or auto");
  }
  if (CudaDeviceCount() < 1) {
    if (choice == DeviceChoice::kAuto) return DeviceChoice::kCpu;
    return absl::FailedPreconditionError(
        "device cuda requested, but LibTorch sees no CUDA device (no GPU or "
        "driver, CUDA_VISIBLE_DEVICES hides them, or libtorch_cuda was not "
        "loaded); choose the device cpu or auto");
  }
  RETURN_IF_ERROR(
      internal::CallTorch("configuring CUDA numerics", [&]() -> absl::Status {
        at::globalContext().setAllowTF32CuDNN(false);
        at::globalContext().setAllowTF32CuBLAS(false);
        at::globalContext().setDeterministicCuDNN(true);
        at::globalContext().setBenchmarkCuDNN(false);
        return absl::OkStatus();
      }));
  return DeviceChoice::kCuda;
}

absl::Status MoveModelTo(DiffusionModel& model, DeviceChoice resolved) {
  switch (resolved) {
    case DeviceChoice::kCpu:
      return model.To(c10::Device(c10::kCPU));
    case DeviceChoice::kCuda:
      return model.To(c10::Device(c10::kCUDA, 0));
    case DeviceChoice::kAuto:
      break;
  }
  return absl::InvalidArgumentError(
      "MoveModelTo takes a resolved device (cpu or cuda), not auto");
}

}  // namespace retrace::model

// Where LibTorch runs a model: the device choice of the query featurizer
// (retraced --featurize-device) and of the training and store-build jobs
// (retrace-batch train / build-store --device). No LibTorch headers, so
// command-line code can parse and check the choice.
//
//   ASSIGN_OR_RETURN(DeviceChoice choice, ParseDeviceChoice(flag));
//   ASSIGN_OR_RETURN(DeviceChoice device, ResolveDevice(choice));  // at start
//   RETURN_IF_ERROR(MoveModelTo(*model, device));
//
// kAuto resolves to CUDA (device 0) when the linked LibTorch was built with
// CUDA and a device is visible, else to the CPU. kCuda that cannot be honoured
// is FAILED_PRECONDITION naming why (a LibTorch without CUDA, or no device),
// so that a process fails at start-up rather than at its first request.
//
// Resolving to CUDA also fixes LibTorch's process-wide CUDA numerics for
// attribution: TF32 off for cuDNN convolutions and cuBLAS matrix products
// (TF32 rounds inputs to 10 mantissa bits, a 1e-3 relative error that CPU and
// GPU features could not agree within) and deterministic cuDNN algorithms
// (the same inputs give the same bits on every run).
//
// Thread safety: ResolveDevice writes LibTorch's global context; call it at
// start-up, before other threads use LibTorch. The rest is thread-safe.
#ifndef RETRACE_SERVER_MODEL_DEVICE_H_
#define RETRACE_SERVER_MODEL_DEVICE_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace::model {

class DiffusionModel;

enum class DeviceChoice { kAuto, kCpu, kCuda };

// "auto", "cpu", "cuda".
const char* DeviceChoiceName(DeviceChoice choice);

// Parses "auto", "cpu" or "cuda"; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<DeviceChoice> ParseDeviceChoice(absl::string_view text);

// Whether the linked LibTorch was built with CUDA (decided at configure time
// from the Torch package CMake found).
bool TorchBuiltWithCuda();

// CUDA devices LibTorch sees (0 without CUDA).
int CudaDeviceCount();

// kCpu or kCuda for `choice` (see the header comment). FAILED_PRECONDITION
// for kCuda when LibTorch has no CUDA or no device is visible.
absl::StatusOr<DeviceChoice> ResolveDevice(DeviceChoice choice);

// Moves the model's parameters and buffers to the resolved device (kCpu or
// kCuda: CUDA device 0); INVALID_ARGUMENT for kAuto, else DiffusionModel::To.
absl::Status MoveModelTo(DiffusionModel& model, DeviceChoice resolved);

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_DEVICE_H_

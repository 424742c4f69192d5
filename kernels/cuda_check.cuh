// CUDA error handling for the kernel layer (CUDA translation units only).
#ifndef RETRACE_KERNELS_CUDA_CHECK_CUH_
#define RETRACE_KERNELS_CUDA_CHECK_CUH_

#include <cuda_runtime.h>

#include <string>

#include "kernels/kernel_status.h"

namespace retrace::kernels {

// Maps a CUDA error to a KernelStatus: allocation failures become
// kOutOfMemory (RESOURCE_EXHAUSTED at the service boundary), the rest
// kDeviceError. `what` names the call that failed.
inline KernelStatus FromCudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return KernelStatus::Ok();
  std::string msg = std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return KernelStatus::OutOfMemory(msg);
  return KernelStatus::DeviceError(msg);
}

// Checks the last launch; with RETRACE_CUDA_DEBUG_SYNC also synchronizes the
// stream so that asynchronous faults are attributed to the right launch.
inline KernelStatus CheckLaunch(cudaStream_t stream, const char* kernel) {
  KernelStatus s = FromCudaError(cudaGetLastError(), kernel);
  if (!s.ok()) return s;
#ifdef RETRACE_CUDA_DEBUG_SYNC
  return FromCudaError(cudaStreamSynchronize(stream), kernel);
#else
  (void)stream;
  return KernelStatus::Ok();
#endif
}

}  // namespace retrace::kernels

#define RETRACE_CUDA_RETURN_IF_ERROR(call) \
  RETRACE_KERNEL_RETURN_IF_ERROR(          \
      ::retrace::kernels::FromCudaError((call), #call))

#endif  // RETRACE_KERNELS_CUDA_CHECK_CUH_

#include <cuda_runtime.h>

#include "kernels/cuda_check.cuh"
#include "kernels/device_memory.h"

namespace retrace::kernels {

KernelStatus DeviceMemoryInfo(size_t* free_bytes, size_t* total_bytes) {
  return FromCudaError(cudaMemGetInfo(free_bytes, total_bytes),
                       "cudaMemGetInfo");
}

KernelStatus DeviceAlloc(size_t bytes, void** ptr) {
  *ptr = nullptr;
  return FromCudaError(cudaMalloc(ptr, bytes), "cudaMalloc");
}

void DeviceFree(void* ptr) {
  if (ptr != nullptr) cudaFree(ptr);
}

KernelStatus PinnedAlloc(size_t bytes, void** ptr) {
  *ptr = nullptr;
  return FromCudaError(cudaMallocHost(ptr, bytes), "cudaMallocHost");
}

void PinnedFree(void* ptr) {
  if (ptr != nullptr) cudaFreeHost(ptr);
}

KernelStatus StreamCreate(CUstream_st** stream) {
  return FromCudaError(cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking),
                       "cudaStreamCreate");
}

void StreamDestroy(CUstream_st* stream) {
  if (stream != nullptr) cudaStreamDestroy(stream);
}

KernelStatus StreamSynchronize(CUstream_st* stream) {
  return FromCudaError(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

KernelStatus CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                               CUstream_st* stream) {
  return FromCudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream),
      "cudaMemcpyAsync(host to device)");
}

KernelStatus CopyToHostAsync(void* dst, const void* src, size_t bytes,
                             CUstream_st* stream) {
  return FromCudaError(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync(device to host)");
}

}  // namespace retrace::kernels

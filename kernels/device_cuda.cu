#include <cuda_runtime.h>

#include <string>

namespace retrace::kernels {

// Reports whether a CUDA device can be used; fills `reason` either way.
bool CudaProbe(std::string* reason) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *reason = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error
    return false;
  }
  if (count == 0) {
    *reason = "no CUDA device present";
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    *reason = "cudaGetDeviceProperties failed";
    cudaGetLastError();
    return false;
  }
  *reason = std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
            std::to_string(prop.minor) + ")";
  return true;
}

}  // namespace retrace::kernels

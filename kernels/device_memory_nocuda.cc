// The device-memory entry points of a build without CUDA.
#include "kernels/device_memory.h"

#ifndef RETRACE_HAVE_CUDA

namespace retrace::kernels {
namespace {

KernelStatus NoCuda() {
  return KernelStatus::Unavailable(
      "built without CUDA (RETRACE_WITH_CUDA=OFF)");
}

}  // namespace

KernelStatus DeviceMemoryInfo(size_t*, size_t*) { return NoCuda(); }
KernelStatus DeviceAlloc(size_t, void** ptr) {
  *ptr = nullptr;
  return NoCuda();
}
void DeviceFree(void*) {}
KernelStatus PinnedAlloc(size_t, void** ptr) {
  *ptr = nullptr;
  return NoCuda();
}
void PinnedFree(void*) {}
KernelStatus StreamCreate(CUstream_st** stream) {
  *stream = nullptr;
  return NoCuda();
}
void StreamDestroy(CUstream_st*) {}
KernelStatus StreamSynchronize(CUstream_st*) { return NoCuda(); }
KernelStatus CopyToDeviceAsync(void*, const void*, size_t, CUstream_st*) {
  return NoCuda();
}
KernelStatus CopyToHostAsync(void*, const void*, size_t, CUstream_st*) {
  return NoCuda();
}

}  // namespace retrace::kernels

#endif  // RETRACE_HAVE_CUDA

// Device and pinned host memory, streams and copies: the few CUDA runtime
// calls that code outside kernels/ needs, behind a header without CUDA types,
// so that server code builds the same with and without CUDA.
//
// Every function returns kUnavailable in a build without CUDA. Allocation
// failures are kOutOfMemory (RESOURCE_EXHAUSTED at the service boundary),
// other CUDA failures kDeviceError naming the call. Thread-safe.
#ifndef RETRACE_KERNELS_DEVICE_MEMORY_H_
#define RETRACE_KERNELS_DEVICE_MEMORY_H_

#include <cstddef>

#include "kernels/kernel_status.h"

struct CUstream_st;

namespace retrace::kernels {

// Free and total memory of the current device, in bytes.
KernelStatus DeviceMemoryInfo(size_t* free_bytes, size_t* total_bytes);

KernelStatus DeviceAlloc(size_t bytes, void** ptr);
void DeviceFree(void* ptr);  // null is a no-op

// Page-locked host memory, for staging copies to the device.
KernelStatus PinnedAlloc(size_t bytes, void** ptr);
void PinnedFree(void* ptr);  // null is a no-op

KernelStatus StreamCreate(CUstream_st** stream);
void StreamDestroy(CUstream_st* stream);  // null is a no-op
KernelStatus StreamSynchronize(CUstream_st* stream);

// Enqueues a host-to-device copy on `stream`; `src` should be pinned for the
// copy to be asynchronous.
KernelStatus CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                               CUstream_st* stream);
KernelStatus CopyToHostAsync(void* dst, const void* src, size_t bytes,
                             CUstream_st* stream);

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_DEVICE_MEMORY_H_

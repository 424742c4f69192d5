// Which compute backends this process can use.
//
// Thread-safe. The answer is computed once per process: a build without CUDA,
// a machine without a driver or without a device all answer "no device", and
// callers then take the CPU path without error.
#ifndef RETRACE_KERNELS_DEVICE_H_
#define RETRACE_KERNELS_DEVICE_H_

#include <cstddef>
#include <string>

#include "kernels/kernel_status.h"

namespace retrace::kernels {

enum class Backend { kCpu, kCuda };

const char* BackendName(Backend backend);

// True when the library was compiled with CUDA support.
bool BuiltWithCuda();

// True when CUDA support was compiled in and at least one device is usable.
bool CudaDeviceAvailable();

// A one-line explanation of why CudaDeviceAvailable() is false (or the device
// name when it is true); used in logs and in the skip reason of gpu tests.
std::string CudaAvailabilityReason();

// The backend to use by default: kCuda when a device is available, else kCpu.
Backend DefaultBackend();

// Number of worker threads the CPU kernels use (hardware concurrency, at least
// 1; overridable with the RETRACE_CPU_THREADS environment variable).
int CpuThreads();

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_DEVICE_H_

#include "kernels/device.h"

#include <cstdlib>
#include <string>
#include <thread>

namespace retrace::kernels {

// Defined in device_cuda.cu when CUDA is compiled in.
#ifdef RETRACE_HAVE_CUDA
bool CudaProbe(std::string* reason);
#endif

namespace {

struct Availability {
  bool available = false;
  std::string reason;
};

const Availability& Probe() {
  static const Availability probe = [] {
    Availability a;
#ifdef RETRACE_HAVE_CUDA
    a.available = CudaProbe(&a.reason);
#else
    a.reason = "built without CUDA (RETRACE_WITH_CUDA=OFF)";
#endif
    return a;
  }();
  return probe;
}

}  // namespace

std::string KernelStatus::ToString() const {
  static constexpr const char* kNames[] = {
      "OK",           "INVALID_ARGUMENT", "OUT_OF_MEMORY",
      "DEVICE_ERROR", "UNAVAILABLE",      "INTERNAL"};
  return std::string(kNames[static_cast<int>(code_)]) +
         (message_.empty() ? "" : ": " + message_);
}

const char* BackendName(Backend backend) {
  return backend == Backend::kCuda ? "cuda" : "cpu";
}

bool BuiltWithCuda() {
#ifdef RETRACE_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

bool CudaDeviceAvailable() { return Probe().available; }

std::string CudaAvailabilityReason() { return Probe().reason; }

Backend DefaultBackend() {
  return CudaDeviceAvailable() ? Backend::kCuda : Backend::kCpu;
}

int CpuThreads() {
  static const int threads = [] {
    if (const char* env = std::getenv("RETRACE_CPU_THREADS")) {
      int n = std::atoi(env);
      if (n > 0) return n;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return threads;
}

}  // namespace retrace::kernels

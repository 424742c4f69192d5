// Projection throughput (target: SJLT >= 10x faster than dense at
// p >= 1e7 on the same device). One iteration projects a whole p-vector:
// Reset, the pieces of at most kPieceCoordinates coordinates each (streamed
// from one reused buffer at increasing global offsets, as a model's parameter
// tensors would be), Finalize.
//
// Prints `RATIO sjlt_vs_dense_p1e7 <dense time / sjlt time>` (CPU) and
// `RATIO sjlt_vs_dense_p1e7_cuda <...>` when a device is present, both from
// runs measured side by side in this process. CUDA benchmarks are registered
// only when a device can be used; the reason is printed otherwise.
//
// Dense projection costs D adds per input value: on the CPU it is only
// measured up to p = 1e7 (B = 1) and 1e6 (B = 8), to keep the run to about a
// minute on 2 cores.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/ratio_reporter.h"
#include "kernels/device.h"
#include "kernels/projection.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace retrace::kernels {
namespace {

constexpr int64_t kPieceCoordinates = int64_t{1} << 22;
constexpr int64_t kOutputDim = 1024;
constexpr int kSparsity = 4;

struct Config {
  Backend backend;
  ProjectionType type;
  int64_t p;
  int64_t batch;
};

std::string PName(int64_t p) {
  const int e = int(std::lround(std::log10(double(p))));
  return "1e" + std::to_string(e);
}

std::string Name(const Config& c) {
  return std::string("projection/") + BackendName(c.backend) + "/" +
         ProjectionTypeName(c.type) + "/p:" + PName(c.p) +
         "/D:" + std::to_string(kOutputDim) + "/B:" + std::to_string(c.batch);
}

ProjectionSpec SpecFor(const Config& c) {
  ProjectionSpec spec;
  spec.type = c.type;
  spec.output_dim = kOutputDim;
  spec.sparsity = kSparsity;
  spec.seed = 2026;
  spec.input_dim = c.p;
  return spec;
}

// Gradient-like values, pre-normalized so that the whole p-vector has unit
// norm (the service projects g/‖g‖).
std::vector<float> PieceData(int64_t batch, int64_t p) {
  const int64_t n = batch * std::min(p, kPieceCoordinates);
  std::vector<float> x(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f,
                                         float(1.0 / std::sqrt(double(p))));
  for (float& v : x) v = normal(rng);
  return x;
}

void RunProjection(benchmark::State& state, const Config& c) {
  const ProjectionSpec spec = SpecFor(c);
  const int64_t piece = std::min(c.p, kPieceCoordinates);
  const std::vector<float> host = PieceData(c.batch, c.p);
  std::vector<float> host_out(c.batch * kOutputDim);
  const float* values = host.data();
  float* out = host_out.data();
  CudaStream stream = nullptr;
#ifdef RETRACE_HAVE_CUDA
  float* device_values = nullptr;
  float* device_out = nullptr;
  if (c.backend == Backend::kCuda) {
    if (cudaStreamCreate(&stream) != cudaSuccess ||
        cudaMalloc(&device_values, host.size() * sizeof(float)) !=
            cudaSuccess ||
        cudaMalloc(&device_out, host_out.size() * sizeof(float)) !=
            cudaSuccess ||
        cudaMemcpy(device_values, host.data(), host.size() * sizeof(float),
                   cudaMemcpyHostToDevice) != cudaSuccess) {
      state.SkipWithError("CUDA set-up failed");
      return;
    }
    values = device_values;
    out = device_out;
  }
#endif
  std::unique_ptr<Projector> projector;
  KernelStatus s =
      Projector::Create(spec, c.batch, c.backend, stream, &projector);
  if (!s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  for (auto _ : state) {
    s = projector->Reset();
    for (int64_t at = 0; s.ok() && at < c.p; at += piece) {
      const int64_t len = std::min(piece, c.p - at);
      s = projector->Accumulate(values, len, piece, at);
    }
    if (s.ok()) s = projector->Finalize(out);  // synchronizes on CUDA
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
  }
  state.SetItemsProcessed(state.iterations() * c.p * c.batch);
  state.SetBytesProcessed(state.iterations() * c.p * c.batch *
                          int64_t(sizeof(float)));
  state.counters["threads"] = c.backend == Backend::kCpu ? CpuThreads() : 0;
  projector.reset();
#ifdef RETRACE_HAVE_CUDA
  if (c.backend == Backend::kCuda) {
    cudaFree(device_values);
    cudaFree(device_out);
    cudaStreamDestroy(stream);
  }
#endif
}

// Console output as usual, plus each run's real time per iteration (seconds)
// by name, for the ratios.
}  // namespace
}  // namespace retrace::kernels

int main(int argc, char** argv) {
  using namespace retrace::kernels;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  std::vector<Backend> backends = {Backend::kCpu};
  if (CudaDeviceAvailable()) {
    backends.push_back(Backend::kCuda);
  } else {
    std::printf("# CUDA projection benchmarks skipped: %s\n",
                CudaAvailabilityReason().c_str());
  }
  // B = 1 (one query) over the whole range; B = 8 to p = 1e7. Dense costs
  // D = 1024 adds per input value, so on the CPU it stops at p = 1e7 (B = 1)
  // and 1e6 (B = 8) to keep the whole run to about a minute on 2 cores.
  const int64_t kP[] = {100000, 1000000, 10000000, 100000000};
  for (Backend backend : backends) {
    const bool cpu = backend == Backend::kCpu;
    for (int64_t batch : {int64_t{1}, int64_t{8}}) {
      const int64_t sjlt_max = batch == 1 ? 100000000 : 10000000;
      const int64_t dense_max =
          cpu ? (batch == 1 ? 10000000 : 1000000) : sjlt_max;
      for (int64_t p : kP) {
        for (ProjectionType type :
             {ProjectionType::kSjlt, ProjectionType::kRademacher}) {
          if (p > (type == ProjectionType::kSjlt ? sjlt_max : dense_max)) {
            continue;
          }
          const Config c{backend, type, p, batch};
          benchmark::RegisterBenchmark(
              Name(c).c_str(),
              [c](benchmark::State& state) { RunProjection(state, c); })
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime()
              ->MinTime(0.3);
        }
      }
    }
  }

  retrace::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::fflush(stdout);
  for (Backend backend : backends) {
    const Config dense{backend, ProjectionType::kRademacher, 10000000, 1};
    const Config sjlt{backend, ProjectionType::kSjlt, 10000000, 1};
    reporter.PrintRatio(backend == Backend::kCpu ? "sjlt_vs_dense_p1e7"
                                                 : "sjlt_vs_dense_p1e7_cuda",
                        Name(dense), Name(sjlt));
  }
  benchmark::Shutdown();
  return 0;
}

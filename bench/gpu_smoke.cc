// A small CUDA scan and projection checked against the CPU backend, short
// enough to run under compute-sanitizer (memcheck, racecheck) in
// scripts/gpu-check.sh. Exits 0 when every result agrees, 1 on a mismatch or
// CUDA error, and 2 without a device (with the reason).
//
// Scan: two shapes (one with D = 12, whose fp16 rows are not 16-byte
// aligned), fp16, every rank's score within 2e-3 of the list's largest
// |score| of the CPU's. Projection: SJLT and dense, two batch vectors in two
// pieces, bit-identical to the CPU (kernels/projection.h promises it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench/synthetic_store.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "kernels/scoring.h"

#ifdef RETRACE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace rk = retrace::kernels;
namespace rb = retrace::bench;

#ifdef RETRACE_HAVE_CUDA
namespace {

constexpr double kRelTol = 2e-3;

// A device copy of a host vector; freed on destruction.
template <typename T>
class DeviceCopy {
 public:
  explicit DeviceCopy(const std::vector<T>& host) {
    ok_ = cudaMalloc(&ptr_, std::max<size_t>(host.size() * sizeof(T), 1)) ==
              cudaSuccess &&
          cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T),
                     cudaMemcpyHostToDevice) == cudaSuccess;
  }
  explicit DeviceCopy(size_t count) {
    ok_ = cudaMalloc(&ptr_, std::max<size_t>(count * sizeof(T), 1)) ==
          cudaSuccess;
  }
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  ~DeviceCopy() { cudaFree(ptr_); }
  bool ok() const { return ok_; }
  T* get() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  bool ok_ = false;
};

struct ScanShape {
  int64_t rows;
  int32_t checkpoints, slots, dim, queries, k;
};

// Returns the number of failures.
int CheckScan(const ScanShape& sh) {
  const rk::StoreLayout layout{rk::DType::kF16, sh.checkpoints, sh.slots,
                               sh.dim};
  const int64_t cs = layout.SlotPairs(), row = layout.RowValues();
  std::vector<uint16_t> vectors(size_t(sh.rows * row));
  std::vector<float> norms(size_t(sh.rows * cs));
  for (size_t i = 0; i < vectors.size(); ++i)
    vectors[i] = rk::FloatToHalf(rb::SyntheticUniform(i, rb::kSeedVectors) *
                                 rb::kVectorScale);
  for (size_t i = 0; i < norms.size(); ++i) norms[i] = rb::SyntheticNorm(i);
  std::vector<float> raw(size_t(sh.queries * row)), unit(raw.size());
  std::vector<float> wt(size_t(sh.queries * cs)), wr(wt.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    raw[i] = rb::SyntheticUniform(i, rb::kSeedRaw);
    unit[i] = rb::SyntheticUniform(i, rb::kSeedUnit);
  }
  for (size_t i = 0; i < wt.size(); ++i) {
    wt[i] = rb::SyntheticWeight(i, rb::kSeedTracinWeights);
    wr[i] = rb::SyntheticWeight(i, rb::kSeedRetracWeights);
  }
  rk::ScanOptions opt;
  opt.k = sh.k;
  rk::ScanResult cpu, gpu;
  rk::KernelStatus s = rk::ScanCpu(
      layout, {{vectors.data(), norms.data(), sh.rows, 0}},
      {sh.queries, raw.data(), unit.data(), wt.data(), wr.data()}, opt, &cpu);
  if (!s.ok()) {
    std::printf("ScanCpu: %s\n", s.ToString().c_str());
    return 1;
  }
  DeviceCopy<uint16_t> d_vectors(vectors);
  DeviceCopy<float> d_norms(norms), d_raw(raw), d_unit(unit), d_wt(wt),
      d_wr(wr);
  const std::vector<rk::StoreChunk> chunks = {
      {d_vectors.get(), d_norms.get(), sh.rows, 0}};
  const rk::QueryBatch batch{sh.queries, d_raw.get(), d_unit.get(), d_wt.get(),
                             d_wr.get()};
  size_t bytes = 0;
  s = rk::CudaScanScratchBytes(layout, chunks, sh.queries, opt, &bytes);
  DeviceCopy<unsigned char> scratch(bytes);
  if (!d_vectors.ok() || !d_norms.ok() || !d_raw.ok() || !d_unit.ok() ||
      !d_wt.ok() || !d_wr.ok() || !scratch.ok()) {
    std::printf("device allocation or copy failed\n");
    return 1;
  }
  if (s.ok())
    s = rk::ScanCuda(layout, chunks, batch, opt, scratch.get(), bytes, nullptr,
                     &gpu);
  if (!s.ok()) {
    std::printf("ScanCuda: %s\n", s.ToString().c_str());
    return 1;
  }
  int failures = 0, moved = 0;
  double max_diff = 0;
  for (int q = 0; q < sh.queries; ++q) {
    for (rk::Method m : {rk::Method::kTracIn, rk::Method::kReTrac}) {
      for (bool top : {true, false}) {
        const auto& c = top ? cpu.Get(q, m).top : cpu.Get(q, m).bottom;
        const auto& g = top ? gpu.Get(q, m).top : gpu.Get(q, m).bottom;
        if (g.size() != c.size()) {
          ++failures;
          continue;
        }
        double scale = 0;
        for (const auto& e : c)
          scale = std::max(scale, double(std::fabs(e.score)));
        for (size_t j = 0; j < c.size(); ++j) {
          const double d = std::fabs(double(g[j].score) - c[j].score);
          max_diff = std::max(max_diff, d);
          if (d > kRelTol * scale + 1e-6) ++failures;
          moved += g[j].index != c[j].index;
        }
      }
    }
  }
  std::printf(
      "scan N=%lld C=%d S=%d D=%d Q=%d k=%d: max |score difference| "
      "%.3g, %d entries at another rank (near ties), %s\n",
      (long long)sh.rows, sh.checkpoints, sh.slots, sh.dim, sh.queries, sh.k,
      max_diff, moved, failures ? "MISMATCH" : "ok");
  return failures ? 1 : 0;
}

int CheckProjection(rk::ProjectionType type) {
  constexpr int64_t kBatch = 2, kP = 100000, kFirst = 60000;
  rk::ProjectionSpec spec;
  spec.type = type;
  spec.output_dim = 256;
  spec.sparsity = 4;
  spec.seed = 7;
  spec.input_dim = kP;
  std::vector<float> x(size_t(kBatch * kP));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = rb::SyntheticUniform(i, 11) / 300.0f;  // L1 well below the bound
  std::vector<float> cpu_out(size_t(kBatch * spec.output_dim));
  std::vector<float> gpu_out(cpu_out.size());
  std::unique_ptr<rk::Projector> cpu, gpu;
  rk::KernelStatus s =
      rk::Projector::Create(spec, kBatch, rk::Backend::kCpu, nullptr, &cpu);
  if (s.ok())
    s = rk::Projector::Create(spec, kBatch, rk::Backend::kCuda, nullptr, &gpu);
  DeviceCopy<float> d_x(x);
  DeviceCopy<float> d_out(gpu_out.size());
  if (!d_x.ok() || !d_out.ok()) {
    std::printf("device allocation or copy failed\n");
    return 1;
  }
  // Two pieces, the second first: the sums must not depend on the order.
  if (s.ok()) s = gpu->Accumulate(d_x.get() + kFirst, kP - kFirst, kP, kFirst);
  if (s.ok()) s = gpu->Accumulate(d_x.get(), kFirst, kP, 0);
  if (s.ok()) s = gpu->Finalize(d_out.get());
  if (s.ok()) s = cpu->Accumulate(x.data(), kP, kP, 0);
  if (s.ok()) s = cpu->Finalize(cpu_out.data());
  if (!s.ok()) {
    std::printf("projection %s: %s\n", rk::ProjectionTypeName(type),
                s.ToString().c_str());
    return 1;
  }
  if (cudaMemcpy(gpu_out.data(), d_out.get(), gpu_out.size() * sizeof(float),
                 cudaMemcpyDeviceToHost) != cudaSuccess) {
    std::printf("cudaMemcpy failed\n");
    return 1;
  }
  int differ = 0;
  for (size_t i = 0; i < cpu_out.size(); ++i)
    differ += rk::FloatBits(cpu_out[i]) != rk::FloatBits(gpu_out[i]);
  std::printf(
      "projection %s B=%lld p=%lld D=%lld: %d of %zu outputs differ "
      "from the CPU's bits, %s\n",
      rk::ProjectionTypeName(type), (long long)kBatch, (long long)kP,
      (long long)spec.output_dim, differ, cpu_out.size(),
      differ ? "MISMATCH" : "ok");
  return differ ? 1 : 0;
}

}  // namespace
#endif  // RETRACE_HAVE_CUDA

int main() {
  if (!rk::CudaDeviceAvailable()) {
    std::printf("gpu_smoke: no CUDA device: %s\n",
                rk::CudaAvailabilityReason().c_str());
    return 2;
  }
#ifdef RETRACE_HAVE_CUDA
  int failures = 0;
  failures += CheckScan({2000, 2, 2, 128, 3, 16});
  failures += CheckScan({777, 1, 3, 12, 2, 100});
  failures += CheckProjection(rk::ProjectionType::kSjlt);
  failures += CheckProjection(rk::ProjectionType::kRademacher);
  if (cudaDeviceSynchronize() != cudaSuccess) ++failures;
  std::printf("gpu_smoke: %s\n", failures ? "FAILED" : "passed");
  return failures ? 1 : 0;
#else
  return 2;
#endif
}

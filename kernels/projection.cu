// CUDA backend of the random projection. Bit-identical to
// projection_cpu.cc: same matrix (projection_impl.h), same fixed-point
// rounding, and only integer atomics, whose sums do not depend on their order.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda_check.cuh"
#include "kernels/projection.h"
#include "kernels/projection_impl.h"

namespace retrace::kernels {

namespace pi = projection_internal;

namespace {

constexpr int kThreadsPerBlock = 256;
// SJLT sums one window of the accumulator in shared memory: 48 KiB, the
// default limit, so no opt-in attribute is needed on any architecture.
constexpr int64_t kWindowWords = 6144;
// Batch vectors one dense block keeps in registers (4 rows x 4 vectors).
constexpr int kDenseBatchTile = 4;
constexpr int kDenseRowsPerLane = 4;
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr unsigned kFullMask = 0xffffffffu;

using ull = unsigned long long;

struct PieceArgs {
  const float* values;
  int64_t row_stride;
  int64_t len;
  uint64_t global_offset;
  double scale;
  uint64_t seed;
  pi::SjltBlocks blocks;  // kSjlt only
  int64_t output_dim;
  int64_t batch;
  uint64_t* sums;   // [D][B]
  uint64_t* l1;     // [B]
  uint64_t* flags;  // [B]
};

__device__ inline ull* AsUll(uint64_t* p) { return reinterpret_cast<ull*>(p); }

// Adds one warp's L1 units and flags of batch vector b to the accumulator.
// Every lane of the warp must call it. kFlagL1 is raised by the add that
// takes the counter to the limit; counters only grow before that, so the
// decision depends on the total alone, as on the CPU.
__device__ void ReportWarp(ull units, ull flag, int64_t b, const PieceArgs& a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    units = pi::SaturatingAdd(units, __shfl_down_sync(kFullMask, units, off));
    flag |= __shfl_down_sync(kFullMask, flag, off);
  }
  if ((threadIdx.x & 31) != 0) return;
  if (units != 0) {
    const ull old = atomicAdd(AsUll(a.l1 + b), units);
    if (old >= pi::kL1Limit || units >= pi::kL1Limit - old) {
      flag |= pi::kFlagL1;
    }
  }
  if (flag != 0) atomicOr(AsUll(a.flags + b), flag);
}

// Thread t: coordinates i ≡ t (mod all x threads) × vectors of window y.
// A window is a tile of output rows x a tile of batch vectors summed in
// shared memory; a thread adds those of its s signed contributions whose rows
// fall in the window, and the block flushes the window to global memory.
__global__ void __launch_bounds__(kThreadsPerBlock)
    SjltAccumulateKernel(PieceArgs a, int64_t row_tile, int64_t batch_tile,
                         int64_t row_tiles, int64_t windows) {
  extern __shared__ ull window[];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t w = blockIdx.y; w < windows; w += gridDim.y) {
    const int64_t r0 = (w % row_tiles) * row_tile;
    const int64_t r1 = min(a.output_dim, r0 + row_tile);
    const int64_t b0 = (w / row_tiles) * batch_tile;
    const int64_t nb = min(a.batch, b0 + batch_tile) - b0;
    const int64_t words = (r1 - r0) * nb;
    // Only the first row tile counts L1 and flags: each value once.
    const bool counts = (w % row_tiles) == 0;
    for (int64_t e = threadIdx.x; e < words; e += blockDim.x) window[e] = 0;
    __syncthreads();
    for (int64_t bb = 0; bb < nb; ++bb) {
      const float* x = a.values + (b0 + bb) * a.row_stride;
      ull units = 0;
      uint64_t flag = 0;
      for (int64_t i = first; i < a.len; i += stride) {
        const int64_t q = pi::QuantizeScaled(x[i], a.scale, &flag);
        if (q == 0) continue;
        units = pi::SaturatingAdd(units, pi::L1Units(q));
        uint32_t rows[8];
        uint32_t negative_mask;
        pi::SjltColumn(a.blocks, a.seed, a.global_offset + uint64_t(i), rows,
                       &negative_mask);
        const ull pos = ull(q);
        const ull neg = ull(0) - pos;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (k >= a.blocks.sparsity) break;
          const int64_t r = rows[k];
          if (r < r0 || r >= r1) continue;
          atomicAdd(&window[(r - r0) * nb + bb],
                    ((negative_mask >> k) & 1u) ? neg : pos);
        }
      }
      if (counts) ReportWarp(units, flag, b0 + bb, a);
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < words; e += blockDim.x) {
      const ull v = window[e];
      if (v != 0) {
        atomicAdd(AsUll(a.sums + (r0 + e / nb) * a.batch + b0 + e % nb), v);
      }
    }
    __syncthreads();  // the next window reuses shared memory
  }
}

// Lane l: coordinate step+l, rows 128·blockIdx.y+32u+l, batch tile blockIdx.z.
// Each warp walks 32-coordinate steps of the piece (grid-stride over warps);
// the warp shares each column by shuffles, each lane adds it to its 4 rows in
// registers, and adds those to the accumulator atomically at the end.
__global__ void __launch_bounds__(kThreadsPerBlock)
    RademacherAccumulateKernel(PieceArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const uint32_t group = blockIdx.y;
  const int64_t b0 = int64_t(blockIdx.z) * kDenseBatchTile;
  const int nb = int(min(int64_t{kDenseBatchTile}, a.batch - b0));
  const bool counts = group == 0;
  ull acc[kDenseRowsPerLane][kDenseBatchTile] = {};
  ull units[kDenseBatchTile] = {};
  ull flags[kDenseBatchTile] = {};
  for (int64_t step = warp * 32; step < a.len; step += warps * 32) {
    const int64_t i = step + lane;
    ull q[kDenseBatchTile];
    bool any = false;
#pragma unroll
    for (int bb = 0; bb < kDenseBatchTile; ++bb) {
      q[bb] = 0;
      if (i < a.len && bb < nb) {
        uint64_t f = 0;
        const int64_t v = pi::QuantizeScaled(
            a.values[(b0 + bb) * a.row_stride + i], a.scale, &f);
        q[bb] = ull(v);
        units[bb] = pi::SaturatingAdd(units[bb], pi::L1Units(v));
        flags[bb] |= f;
        any |= v != 0;
      }
    }
    Philox4x32Block bits = {{0u, 0u, 0u, 0u}};
    if (any) {
      bits = pi::RademacherSigns(a.seed, a.global_offset + uint64_t(i), group);
    }
    // Columns whose values are all zero add nothing: skip them.
    unsigned live = __ballot_sync(kFullMask, any);
    while (live != 0) {
      const int c = __ffs(live) - 1;
      live &= live - 1;
      uint32_t w[kDenseRowsPerLane];
#pragma unroll
      for (int u = 0; u < kDenseRowsPerLane; ++u) {
        w[u] = __shfl_sync(kFullMask, bits.v[u], c);
      }
#pragma unroll
      for (int bb = 0; bb < kDenseBatchTile; ++bb) {
        const ull qc = __shfl_sync(kFullMask, q[bb], c);
#pragma unroll
        for (int u = 0; u < kDenseRowsPerLane; ++u) {
          const ull neg = ull(0) - ull((w[u] >> lane) & 1u);
          acc[u][bb] += (qc ^ neg) - neg;
        }
      }
    }
  }
  const int64_t row0 = int64_t(group) * pi::kRademacherRowsPerBlock;
#pragma unroll
  for (int u = 0; u < kDenseRowsPerLane; ++u) {
    const int64_t row = row0 + 32 * u + lane;
    if (row >= a.output_dim) continue;
#pragma unroll
    for (int bb = 0; bb < kDenseBatchTile; ++bb) {
      if (bb < nb && acc[u][bb] != 0) {
        atomicAdd(AsUll(a.sums + row * a.batch + b0 + bb), acc[u][bb]);
      }
    }
  }
  if (counts) {
#pragma unroll
    for (int bb = 0; bb < kDenseBatchTile; ++bb) {
      if (bb < nb) ReportWarp(units[bb], flags[bb], b0 + bb, a);
    }
  }
}

// One thread per output element e = b·D + j (grid-stride over B·D).
// The same double conversion, product and float rounding as the CPU.
__global__ void __launch_bounds__(kThreadsPerBlock)
    FinalizeKernel(const uint64_t* sums, int64_t d, int64_t batch,
                   double factor, float* output) {
  const int64_t total = d * batch;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t b = e / d;
    const int64_t j = e - b * d;
    const double sum =
        __ll2double_rn(static_cast<long long>(sums[j * batch + b]));
    output[e] = __double2float_rn(__dmul_rn(sum, factor));
  }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

KernelStatus MultiprocessorCount(int64_t* out) {
  int device = 0;
  int sms = 0;
  RETRACE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  RETRACE_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  *out = std::max(sms, 1);
  return KernelStatus::Ok();
}

// A host pointer handed to a kernel would fault and poison the CUDA context
// for the whole process; refuse it up front instead.
KernelStatus CheckDeviceAccessible(const void* p, const char* what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky; keep it from reaching CheckLaunch
    return KernelStatus::InvalidArgument(
        std::string("projection on CUDA: cannot query ") + what +
        " pointer: " + cudaGetErrorString(err));
  }
  if (attr.type == cudaMemoryTypeUnregistered) {
    return KernelStatus::InvalidArgument(
        std::string("projection on CUDA: ") + what +
        " is pageable host memory; pass device (or pinned/managed) memory");
  }
  return KernelStatus::Ok();
}

// Unavailable when no device can be used, so that callers of a CUDA build on
// a machine without a GPU get the same answer as from a build without CUDA.
KernelStatus RequireDevice() {
  if (CudaDeviceAvailable()) return KernelStatus::Ok();
  return KernelStatus::Unavailable("projection on CUDA: " +
                                   CudaAvailabilityReason());
}

}  // namespace

KernelStatus AllocateProjectionAccumulatorCuda(int64_t words, uint64_t** out) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, size_t(words) * sizeof(uint64_t));
  if (err != cudaSuccess) {
    cudaGetLastError();
    return FromCudaError(err, "cudaMalloc(projection accumulator)");
  }
  *out = static_cast<uint64_t*>(p);
  return KernelStatus::Ok();
}

void FreeProjectionAccumulatorCuda(uint64_t* accumulator) {
  cudaFree(accumulator);
}

KernelStatus ProjectResetCuda(const ProjectionSpec& spec, int64_t batch,
                              uint64_t* accumulator, CudaStream stream) {
  RETRACE_KERNEL_RETURN_IF_ERROR(RequireDevice());
  const int64_t words = ProjectionAccumulatorWords(spec, batch);
  if (words < 0) {
    RETRACE_KERNEL_RETURN_IF_ERROR(ValidateProjectionSpec(spec));
    return KernelStatus::InvalidArgument("projection batch must be in 1.." +
                                         std::to_string(kMaxProjectionBatch) +
                                         ", got " + std::to_string(batch));
  }
  if (accumulator == nullptr) {
    return KernelStatus::InvalidArgument("projection accumulator is null");
  }
  RETRACE_KERNEL_RETURN_IF_ERROR(
      CheckDeviceAccessible(accumulator, "accumulator"));
  RETRACE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
      accumulator, 0, size_t(words) * sizeof(uint64_t), stream));
  return KernelStatus::Ok();
}

KernelStatus ProjectAccumulateCuda(const ProjectionSpec& spec,
                                   const float* values, int64_t batch,
                                   int64_t len, int64_t row_stride,
                                   int64_t global_offset, double input_scale,
                                   uint64_t* accumulator, CudaStream stream) {
  RETRACE_KERNEL_RETURN_IF_ERROR(
      pi::ValidateAccumulateArgs(spec, values, batch, len, row_stride,
                                 global_offset, input_scale, accumulator));
  RETRACE_KERNEL_RETURN_IF_ERROR(RequireDevice());
  if (len == 0) return KernelStatus::Ok();
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckDeviceAccessible(values, "values"));
  RETRACE_KERNEL_RETURN_IF_ERROR(
      CheckDeviceAccessible(accumulator, "accumulator"));
  int64_t sms = 1;
  RETRACE_KERNEL_RETURN_IF_ERROR(MultiprocessorCount(&sms));

  const int64_t d = spec.output_dim;
  PieceArgs a;
  a.values = values;
  a.row_stride = row_stride;
  a.len = len;
  a.global_offset = uint64_t(global_offset);
  a.scale = input_scale;
  a.seed = spec.seed;
  a.blocks = spec.type == ProjectionType::kSjlt ? pi::MakeSjltBlocks(spec)
                                                : pi::SjltBlocks{};
  a.output_dim = d;
  a.batch = batch;
  a.sums = accumulator;
  a.l1 = accumulator + d * batch;
  a.flags = accumulator + d * batch + batch;

  // Grid sizes below only affect speed: the sums are the same for any grid.
  if (spec.type == ProjectionType::kSjlt) {
    int64_t row_tile = d;
    int64_t batch_tile =
        std::min(batch, std::max<int64_t>(1, kWindowWords / d));
    if (d > kWindowWords) {
      row_tile = kWindowWords;
      batch_tile = 1;
    }
    const int64_t row_tiles = CeilDiv(d, row_tile);
    const int64_t windows = row_tiles * CeilDiv(batch, batch_tile);
    const int64_t grid_y = std::min(windows, kMaxGridY);
    const int64_t grid_x =
        std::clamp<int64_t>(CeilDiv(len, int64_t{kThreadsPerBlock} * 4), 1,
                            std::max<int64_t>(1, kBlocksPerSm * sms / grid_y));
    const size_t shared = size_t(row_tile * batch_tile) * sizeof(ull);
    SjltAccumulateKernel<<<dim3(unsigned(std::min(grid_x, kMaxGridX)),
                                unsigned(grid_y)),
                           kThreadsPerBlock, shared, stream>>>(
        a, row_tile, batch_tile, row_tiles, windows);
    return CheckLaunch(stream, "SjltAccumulateKernel");
  }

  const int64_t groups = CeilDiv(d, pi::kRademacherRowsPerBlock);
  const int64_t tiles = CeilDiv(batch, kDenseBatchTile);
  const int64_t grid_x = std::clamp<int64_t>(
      CeilDiv(len, int64_t{kThreadsPerBlock} * 8), 1,
      std::max<int64_t>(1, kBlocksPerSm * sms / (groups * tiles)));
  RademacherAccumulateKernel<<<dim3(unsigned(std::min(grid_x, kMaxGridX)),
                                    unsigned(groups), unsigned(tiles)),
                               kThreadsPerBlock, 0, stream>>>(a);
  return CheckLaunch(stream, "RademacherAccumulateKernel");
}

KernelStatus ProjectFinalizeCuda(const ProjectionSpec& spec,
                                 const uint64_t* accumulator, int64_t batch,
                                 float* output, CudaStream stream) {
  RETRACE_KERNEL_RETURN_IF_ERROR(
      pi::ValidateFinalizeArgs(spec, accumulator, batch, output));
  RETRACE_KERNEL_RETURN_IF_ERROR(RequireDevice());
  RETRACE_KERNEL_RETURN_IF_ERROR(
      CheckDeviceAccessible(accumulator, "accumulator"));
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckDeviceAccessible(output, "output"));
  int64_t sms = 1;
  RETRACE_KERNEL_RETURN_IF_ERROR(MultiprocessorCount(&sms));
  const int64_t d = spec.output_dim;
  const int64_t grid = std::clamp<int64_t>(CeilDiv(d * batch, kThreadsPerBlock),
                                           1, kBlocksPerSm * sms * 8);
  FinalizeKernel<<<unsigned(grid), kThreadsPerBlock, 0, stream>>>(
      accumulator, d, batch, pi::OutputFactor(spec), output);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "FinalizeKernel"));

  std::vector<uint64_t> flags(size_t(batch), 0);
  RETRACE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      flags.data(), accumulator + d * batch + batch,
      size_t(batch) * sizeof(uint64_t), cudaMemcpyDeviceToHost, stream));
  RETRACE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return pi::FlagsToStatus(flags.data(), batch);
}

}  // namespace retrace::kernels

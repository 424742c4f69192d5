// CUDA backend of the fused scoring scan; see scoring.h for the contract.
//
// Pipeline (all on the caller's stream, then one synchronization):
//  1. PrepareQueryMatrixKernel / PrepareWeightsKernel re-lay the queries as a
//     [C*S, D, ncols] fp32 matrix (column = 2 * query + method, zero-padded to
//     ncols = 4 * TX columns) plus per-column weights, flag the slots that any
//     query uses, and record the first non-finite query value.
//  2. ScanKernel: each block owns a tile of rows and all columns. For every
//     used slot it streams the tile's row pieces through shared memory (each
//     row is read from device memory once, with evict-first loads so the
//     query matrix stays in L2), accumulates the [rows, columns] dots of the
//     slot in registers, and folds them into the per-row scores with the slot
//     weights and norms. Only the final scores [2Q, N] leave the block: the
//     [N, slots, Q] partial dots never touch global memory.
//  3. SelectKernel: one block per column finds the exact k-th best key by a
//     3-pass radix select over the packed ranking keys (kernels/topk.h), takes
//     everything above it and the lowest positions among the ties, and sorts
//     the k winners with a bitonic sort in shared memory. Exact for any
//     k <= 4096 and any N.
//  4. BreakdownKernel (optional) recomputes the per-slot terms of the returned
//     rows with the same operation sequence as ScanKernel.
//
// Determinism: the dot of (row, column, slot) is one fmaf chain over d in
// order, and the slot terms are folded in cs order, in every configuration,
// so a score does not depend on the batch, the tiling or the chunking.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda_check.cuh"
#include "kernels/device.h"
#include "kernels/scoring.h"
#include "kernels/topk.h"

namespace retrace::kernels {
namespace {

constexpr int kScanThreads = 256;
constexpr int kTileK = 32;           // store values per row piece and k-step
constexpr int kWeightThreads = 128;  // >= the largest ncols (4 * 32)
constexpr int kSelectThreads = 1024;
constexpr int kRadixBins = 2048;  // 11-bit digits: passes of 11, 11, 10 bits
constexpr int kSortCapacity = kMaxTopK;  // a power of two
constexpr size_t kScratchAlign = 256;
constexpr unsigned long long kNoBadValue = ~0ull;
constexpr int kPrepareBlocks = 1024;

static_assert((kSortCapacity & (kSortCapacity - 1)) == 0, "bitonic sort size");

// ---------------------------------------------------------------------------
// Element types.

template <DType DT>
struct Elem;

template <>
struct Elem<DType::kF16> {
  using T = uint16_t;
  static constexpr int kVec = 8;  // values per 16-byte load
  __device__ static float ToFloat(uint16_t h) {
    return __half2float(__ushort_as_half(h));
  }
};

template <>
struct Elem<DType::kBF16> {
  using T = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float ToFloat(uint16_t h) {
    return __uint_as_float(uint32_t(h) << 16);
  }
};

template <>
struct Elem<DType::kF32> {
  using T = float;
  static constexpr int kVec = 4;
  __device__ static float ToFloat(float f) { return f; }
};

// Unpacks one 16-byte load (little-endian: the lower half of each word is
// the lower address).
template <DType DT>
__device__ void Unpack(uint4 v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (DT == DType::kF32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = Elem<DT>::ToFloat(uint16_t(w[i] & 0xffffu));
      out[2 * i + 1] = Elem<DT>::ToFloat(uint16_t(w[i] >> 16));
    }
  }
}

// ---------------------------------------------------------------------------
// Launch configuration: TX thread columns of 4 score columns each, TY = 256 /
// TX thread rows of TM rows each.

int ColumnGroups(int num_queries) {
  int tx = 1;
  while (4 * tx < 2 * num_queries) tx *= 2;
  return tx;
}

// ---------------------------------------------------------------------------
// Kernels.

// One thread per (slot pair, dimension, column) element of the query matrix.
__global__ void PrepareQueryMatrixKernel(const float* raw, const float* unit,
                                         int num_queries, int64_t cs_count,
                                         int64_t dim, int ncols, float* qmat,
                                         unsigned long long* bad) {
  const int64_t total = cs_count * dim * ncols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int col = int(i % ncols);
    const int64_t rest = i / ncols;
    const int64_t d = rest % dim;
    const int64_t cs = rest / dim;
    float v = 0.0f;
    if (col < 2 * num_queries) {
      const int q = col / 2, m = col % 2;
      v = (m == 0 ? raw : unit)[(q * cs_count + cs) * dim + d];
      if (!isfinite(v)) {
        atomicMin(bad, (unsigned long long)((q * cs_count + cs) * 4 + m));
        v = 0.0f;
      }
    }
    qmat[i] = v;
  }
}

// One block per slot pair; thread t handles score column t.
__global__ void PrepareWeightsKernel(const float* tracin, const float* retrac,
                                     int num_queries, int64_t cs_count,
                                     int ncols, float* scale, int* slot_active,
                                     unsigned long long* bad) {
  const int64_t cs = blockIdx.x;
  const int col = threadIdx.x;
  float w = 0.0f;
  if (col < 2 * num_queries) {
    const int q = col / 2, m = col % 2;
    w = (m == 0 ? tracin : retrac)[q * cs_count + cs];
    if (!isfinite(w)) {
      atomicMin(bad, (unsigned long long)((q * cs_count + cs) * 4 + 2 + m));
      w = 0.0f;
    }
  }
  if (col < ncols) scale[cs * ncols + col] = w;
  const int any = __syncthreads_or(w != 0.0f);
  if (col == 0) slot_active[cs] = any;
}

struct ScanArgs {
  const void* vectors;  // chunk rows, device
  const float* norms;
  int64_t rows;
  int64_t pos0;        // position of row 0 in the scores buffer
  int64_t total_rows;  // length of one scores column
  int64_t cs_count;
  int32_t dim;
  int32_t num_cols;    // 2Q real columns
  bool vector_loads;   // 16-byte loads are aligned and in range
  const float* qmat;   // [cs, dim, ncols]
  const float* scale;  // [cs, ncols]
  const int* slot_active;
  float* scores;  // [num_cols, total_rows]
};

// Block b scores rows [b*BM, (b+1)*BM) of the chunk against every column;
// thread (tx, ty) owns rows ty + i*TY (i < TM) and columns 4*tx .. 4*tx+3.
template <DType DT, int TX, int TM>
__global__ void __launch_bounds__(kScanThreads) ScanKernel(ScanArgs a) {
  constexpr int kTy = kScanThreads / TX;
  constexpr int kBm = kTy * TM;
  constexpr int kCols = 4 * TX;
  constexpr int kVec = Elem<DT>::kVec;
  constexpr int kVecsPerPiece = kTileK / kVec;
  using T = typename Elem<DT>::T;
  // +1 column: the transposed stores of consecutive rows hit distinct banks.
  __shared__ float su[kTileK][kBm + 1];
  __shared__ __align__(16) float sq[kTileK][kCols];

  const T* vec = static_cast<const T*>(a.vectors);
  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int64_t row0 = int64_t(blockIdx.x) * kBm;
  const int64_t row_values = a.cs_count * a.dim;

  float score[TM][4];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) score[i][j] = 0.0f;
  }

  for (int64_t cs = 0; cs < a.cs_count; ++cs) {
    if (!a.slot_active[cs]) continue;  // same answer for the whole block
    float acc[TM][4];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    for (int d0 = 0; d0 < a.dim; d0 += kTileK) {
      __syncthreads();  // the previous step has finished reading su and sq
      if (a.vector_loads) {
        for (int v = tid; v < kBm * kVecsPerPiece; v += kScanThreads) {
          const int r = v / kVecsPerPiece, vk = v % kVecsPerPiece;
          const int64_t row = row0 + r;
          const int d = d0 + vk * kVec;
          float f[kVec];
          if (row < a.rows && d < a.dim) {
            const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(
                vec + row * row_values + cs * a.dim + d));
            Unpack<DT>(raw, f);
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) f[e] = 0.0f;
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) su[vk * kVec + e][r] = f[e];
        }
      } else {
        for (int v = tid; v < kBm * kTileK; v += kScanThreads) {
          const int r = v / kTileK, kk = v % kTileK;
          const int64_t row = row0 + r;
          const int d = d0 + kk;
          float f = 0.0f;
          if (row < a.rows && d < a.dim) {
            f = Elem<DT>::ToFloat(vec[row * row_values + cs * a.dim + d]);
          }
          su[kk][r] = f;
        }
      }
      const float4* qsrc =
          reinterpret_cast<const float4*>(a.qmat + (cs * a.dim + d0) * kCols);
      for (int v = tid; v < kTileK * kCols / 4; v += kScanThreads) {
        const int kk = v / (kCols / 4);
        reinterpret_cast<float4*>(&sq[0][0])[v] =
            d0 + kk < a.dim ? qsrc[v] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTileK; ++kk) {
        const float4 b = reinterpret_cast<const float4*>(&sq[kk][0])[tx];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float u = su[kk][ty + i * kTy];
          acc[i][0] = fmaf(u, b.x, acc[i][0]);
          acc[i][1] = fmaf(u, b.y, acc[i][1]);
          acc[i][2] = fmaf(u, b.z, acc[i][2]);
          acc[i][3] = fmaf(u, b.w, acc[i][3]);
        }
      }
    }
    // Columns 4tx and 4tx+2 are TracIn (even), the others ReTrac.
    const float4 w = reinterpret_cast<const float4*>(a.scale + cs * kCols)[tx];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = row0 + ty + i * kTy;
      const float norm = row < a.rows ? a.norms[row * a.cs_count + cs] : 0.0f;
      score[i][0] = fmaf(w.x * norm, acc[i][0], score[i][0]);
      score[i][1] = fmaf(w.y, acc[i][1], score[i][1]);
      score[i][2] = fmaf(w.z * norm, acc[i][2], score[i][2]);
      score[i][3] = fmaf(w.w, acc[i][3], score[i][3]);
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = row0 + ty + i * kTy;
    if (row >= a.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = 4 * tx + j;
      if (col < a.num_cols)
        a.scores[col * a.total_rows + a.pos0 + row] = score[i][j];
    }
  }
}

// Block c selects the top-k (then the bottom-k) of score column c; the block's
// threads stride over the column's positions.
__global__ void __launch_bounds__(kSelectThreads)
    SelectKernel(const float* scores, int64_t total_rows, int k, int lists,
                 unsigned long long* selected) {
  __shared__ unsigned hist[kRadixBins];
  __shared__ unsigned long long sel[kSortCapacity];
  __shared__ unsigned warp_counts[kSelectThreads / 32];
  __shared__ unsigned s_bucket, s_remaining, s_count;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const float* column = scores + int64_t(blockIdx.x) * total_rows;

  for (int list = 0; list < lists; ++list) {
    const bool top = list == 0;
    uint32_t prefix = 0, prefix_mask = 0;
    uint32_t remaining = uint32_t(k);
    for (int pass = 0; pass < 3; ++pass) {
      const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
      const uint32_t digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
      for (int b = tid; b < kRadixBins; b += kSelectThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t p = tid; p < total_rows; p += kSelectThreads) {
        const uint32_t key = RankKey(column[p], top);
        if ((key & prefix_mask) == prefix) {
          atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
        }
      }
      __syncthreads();
      if (tid == 0) {
        uint32_t above = 0;
        for (int b = int(digit_mask); b >= 0; --b) {
          if (above + hist[b] >= remaining) {
            s_bucket = uint32_t(b);
            s_remaining = remaining - above;
            break;
          }
          above += hist[b];
        }
      }
      __syncthreads();
      prefix |= s_bucket << shift;
      prefix_mask |= digit_mask << shift;
      remaining = s_remaining;
      __syncthreads();  // s_bucket is rewritten in the next pass
    }
    // prefix is now the k-th best key: take every key above it, then the
    // `remaining` lowest positions holding exactly that key.
    const uint32_t threshold = prefix;
    const uint32_t above = uint32_t(k) - remaining;
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int64_t p = tid; p < total_rows; p += kSelectThreads) {
      const uint32_t key = RankKey(column[p], top);
      if (key > threshold) sel[atomicAdd(&s_count, 1u)] = PackCandidate(key, p);
    }
    __syncthreads();
    uint32_t taken = 0;  // uniform across the block
    for (int64_t base = 0; base < total_rows && taken < remaining;
         base += kSelectThreads) {
      const int64_t p = base + tid;
      const bool flag = p < total_rows && RankKey(column[p], top) == threshold;
      const unsigned ballot = __ballot_sync(0xffffffffu, flag);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      uint32_t before = __popc(ballot & ((1u << lane) - 1u));
      uint32_t total = 0;
      for (int w = 0; w < kSelectThreads / 32; ++w) {
        if (w < warp) before += warp_counts[w];
        total += warp_counts[w];
      }
      if (flag && taken + before < remaining) {
        sel[above + taken + before] = PackCandidate(threshold, p);
      }
      taken += total;
      __syncthreads();  // warp_counts is rewritten in the next round
    }
    int n = 1;
    while (n < k) n <<= 1;
    for (int i = k + tid; i < n; i += kSelectThreads) sel[i] = 0ull;  // worst
    __syncthreads();
    // Bitonic sort, descending: larger packed candidates are better.
    for (int size = 2; size <= n; size <<= 1) {
      for (int stride = size / 2; stride > 0; stride >>= 1) {
        for (int i = tid; i < n; i += kSelectThreads) {
          const int j = i ^ stride;
          if (j > i) {
            const unsigned long long x = sel[i], y = sel[j];
            const bool descending = (i & size) == 0;
            if (descending ? x < y : x > y) {
              sel[i] = y;
              sel[j] = x;
            }
          }
        }
        __syncthreads();
      }
    }
    unsigned long long* out =
        selected + (int64_t(blockIdx.x) * lists + list) * int64_t(k);
    for (int i = tid; i < k; i += kSelectThreads) out[i] = sel[i];
    __syncthreads();  // sel is reused by the next list
  }
}

struct BreakdownArgs {
  const void* vectors;
  const float* norms;
  int64_t rows;
  int64_t pos0;
  int64_t cs_count;
  int32_t dim;
  int32_t ncols;
  int32_t k;
  int32_t lists;
  int64_t entries;  // num_cols * lists * k
  const unsigned long long* selected;
  const float* qmat;
  const float* scale;
  const int* slot_active;
  float* breakdown;  // [entries, cs_count]
};

// One thread per (returned entry, slot pair); entries whose row lies outside
// this chunk are left to the launch for their own chunk.
template <DType DT>
__global__ void BreakdownKernel(BreakdownArgs a) {
  using T = typename Elem<DT>::T;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.entries * a.cs_count) return;
  const int64_t e = i / a.cs_count, cs = i % a.cs_count;
  const int64_t pos = CandidateIndex(a.selected[e]);
  if (pos < a.pos0 || pos >= a.pos0 + a.rows) return;
  const int64_t row = pos - a.pos0;
  const int col = int(e / (int64_t(a.lists) * a.k));
  float out = 0.0f;
  if (a.slot_active[cs]) {
    // The same operation sequence as ScanKernel: one fmaf chain over d.
    const T* u =
        static_cast<const T*>(a.vectors) + (row * a.cs_count + cs) * a.dim;
    const float* q = a.qmat + cs * a.dim * a.ncols + col;
    float acc = 0.0f;
    for (int d = 0; d < a.dim; ++d) {
      acc = fmaf(Elem<DT>::ToFloat(u[d]), q[int64_t(d) * a.ncols], acc);
    }
    const float f = col % 2 == 0 ? a.norms[row * a.cs_count + cs] : 1.0f;
    out = (a.scale[cs * a.ncols + col] * f) * acc;
  }
  a.breakdown[i] = out;
}

// ---------------------------------------------------------------------------
// Host side.

struct ScratchPlan {
  size_t qmat = 0, scale = 0, slot_active = 0, bad = 0, scores = 0,
         selected = 0, breakdown = 0, total = 0;
};

ScratchPlan PlanScratch(const StoreLayout& layout, int64_t total_rows,
                        int num_queries, const ScanOptions& options) {
  const size_t ncols = size_t(4 * ColumnGroups(num_queries));
  const size_t cs = size_t(layout.SlotPairs());
  const size_t cols = size_t(2 * num_queries);
  const size_t lists = options.want_bottom ? 2 : 1;
  const size_t k = size_t(options.k);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset += (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    return at;
  };
  ScratchPlan p;
  p.qmat = take(cs * size_t(layout.dim) * ncols * sizeof(float));
  p.scale = take(cs * ncols * sizeof(float));
  p.slot_active = take(cs * sizeof(int));
  p.bad = take(sizeof(unsigned long long));
  p.scores = take(cols * size_t(total_rows) * sizeof(float));
  p.selected = take(cols * lists * k * sizeof(unsigned long long));
  if (options.want_breakdown) {
    p.breakdown = take(cols * lists * k * cs * sizeof(float));
  }
  p.total = offset;
  return p;
}

int64_t TotalRows(const std::vector<StoreChunk>& chunks) {
  int64_t n = 0;
  for (const StoreChunk& c : chunks) n += c.rows;
  return n;
}

template <DType DT, int TX, int TM>
KernelStatus LaunchScanTyped(const ScanArgs& args, cudaStream_t stream) {
  constexpr int64_t kBm = int64_t(kScanThreads / TX) * TM;
  const int64_t blocks = (args.rows + kBm - 1) / kBm;
  if (blocks > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument(
        "chunk has too many rows for one launch");
  }
  ScanKernel<DT, TX, TM><<<unsigned(blocks), kScanThreads, 0, stream>>>(args);
  return CheckLaunch(stream, "ScanKernel");
}

template <DType DT>
KernelStatus LaunchScanForDType(int tx, const ScanArgs& args,
                                cudaStream_t stream) {
  // Rows per thread grow with the column groups so that each thread keeps
  // 4..32 accumulators and a block covers 64..256 rows.
  switch (tx) {
    case 1:
      return LaunchScanTyped<DT, 1, 1>(args, stream);
    case 2:
      return LaunchScanTyped<DT, 2, 2>(args, stream);
    case 4:
      return LaunchScanTyped<DT, 4, 2>(args, stream);
    case 8:
      return LaunchScanTyped<DT, 8, 4>(args, stream);
    case 16:
      return LaunchScanTyped<DT, 16, 8>(args, stream);
    case 32:
      return LaunchScanTyped<DT, 32, 8>(args, stream);
  }
  return KernelStatus::Internal("no scan configuration for " +
                                std::to_string(tx) + " column groups");
}

KernelStatus LaunchScan(DType dtype, int tx, const ScanArgs& args,
                        cudaStream_t stream) {
  switch (dtype) {
    case DType::kF16:
      return LaunchScanForDType<DType::kF16>(tx, args, stream);
    case DType::kBF16:
      return LaunchScanForDType<DType::kBF16>(tx, args, stream);
    case DType::kF32:
      return LaunchScanForDType<DType::kF32>(tx, args, stream);
  }
  return KernelStatus::Internal("unknown dtype");
}

KernelStatus LaunchBreakdown(DType dtype, const BreakdownArgs& args,
                             cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = args.entries * args.cs_count;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument("breakdown too large for one launch");
  }
  switch (dtype) {
    case DType::kF16:
      BreakdownKernel<DType::kF16>
          <<<unsigned(blocks), kThreads, 0, stream>>>(args);
      break;
    case DType::kBF16:
      BreakdownKernel<DType::kBF16>
          <<<unsigned(blocks), kThreads, 0, stream>>>(args);
      break;
    case DType::kF32:
      BreakdownKernel<DType::kF32>
          <<<unsigned(blocks), kThreads, 0, stream>>>(args);
      break;
  }
  return CheckLaunch(stream, "BreakdownKernel");
}

std::string BadQueryMessage(const StoreLayout& layout,
                            unsigned long long code) {
  static constexpr const char* kWhat[] = {"raw vector", "unit vector",
                                          "tracin weight", "retrac weight"};
  const int64_t cs_count = layout.SlotPairs();
  const int64_t qcs = int64_t(code / 4);
  const int64_t q = qcs / cs_count, cs = qcs % cs_count;
  return "query " + std::to_string(q) + ", checkpoint " +
         std::to_string(cs / layout.slots) + " slot " +
         std::to_string(cs % layout.slots) + ": " + kWhat[code % 4] +
         " has a NaN or infinite value";
}

KernelStatus ScanCudaImpl(const StoreLayout& layout,
                          const std::vector<StoreChunk>& chunks,
                          const QueryBatch& queries, const ScanOptions& options,
                          void* scratch, size_t scratch_bytes,
                          cudaStream_t stream, ScanResult* result) {
  const int nq = queries.num_queries;
  const int tx = ColumnGroups(nq);
  const int ncols = 4 * tx;
  const int num_cols = 2 * nq;
  const int lists = options.want_bottom ? 2 : 1;
  const int k = options.k;
  const int64_t cs_count = layout.SlotPairs();
  const int64_t total_rows = TotalRows(chunks);
  const ScratchPlan plan = PlanScratch(layout, total_rows, nq, options);
  if (scratch == nullptr || scratch_bytes < plan.total) {
    return KernelStatus::InvalidArgument(
        "scan scratch of " + std::to_string(scratch_bytes) + " bytes, " +
        std::to_string(plan.total) + " needed (CudaScanScratchBytes)");
  }
  char* base = static_cast<char*>(scratch);
  float* qmat = reinterpret_cast<float*>(base + plan.qmat);
  float* scale = reinterpret_cast<float*>(base + plan.scale);
  int* slot_active = reinterpret_cast<int*>(base + plan.slot_active);
  auto* bad = reinterpret_cast<unsigned long long*>(base + plan.bad);
  float* scores = reinterpret_cast<float*>(base + plan.scores);
  auto* selected = reinterpret_cast<unsigned long long*>(base + plan.selected);
  float* breakdown = reinterpret_cast<float*>(base + plan.breakdown);

  // 1. Queries.
  RETRACE_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(bad, 0xff, sizeof(*bad), stream));
  const int64_t qmat_values = cs_count * layout.dim * ncols;
  const int prep_blocks = int(std::min<int64_t>(
      kPrepareBlocks, (qmat_values + kScanThreads - 1) / kScanThreads));
  PrepareQueryMatrixKernel<<<prep_blocks, kScanThreads, 0, stream>>>(
      queries.raw, queries.unit, nq, cs_count, layout.dim, ncols, qmat, bad);
  RETRACE_KERNEL_RETURN_IF_ERROR(
      CheckLaunch(stream, "PrepareQueryMatrixKernel"));
  if (cs_count > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument("too many (checkpoint, slot) pairs");
  }
  PrepareWeightsKernel<<<unsigned(cs_count), kWeightThreads, 0, stream>>>(
      queries.tracin_weights, queries.retrac_weights, nq, cs_count, ncols,
      scale, slot_active, bad);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "PrepareWeightsKernel"));
  unsigned long long bad_code = kNoBadValue;
  RETRACE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&bad_code, bad, sizeof(bad_code),
                                               cudaMemcpyDeviceToHost, stream));
  RETRACE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (bad_code != kNoBadValue) {
    return KernelStatus::InvalidArgument(BadQueryMessage(layout, bad_code));
  }

  // 2. Scores, chunk by chunk, at positions in global index order so that the
  // lowest position among ties is the lowest sample index.
  std::vector<int32_t> order(chunks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return chunks[size_t(a)].first_index < chunks[size_t(b)].first_index;
  });
  std::vector<int64_t> pos0(chunks.size());  // in `order`
  int64_t pos = 0;
  const int64_t vec_values = 16 / DTypeSize(layout.dtype);  // per 16-byte load
  for (size_t o = 0; o < order.size(); ++o) {
    const StoreChunk& c = chunks[size_t(order[o])];
    pos0[o] = pos;
    ScanArgs args;
    args.vectors = c.vectors;
    args.norms = c.norms;
    args.rows = c.rows;
    args.pos0 = pos;
    args.total_rows = total_rows;
    args.cs_count = cs_count;
    args.dim = layout.dim;
    args.num_cols = num_cols;
    args.vector_loads = layout.dim % vec_values == 0 &&
                        reinterpret_cast<uintptr_t>(c.vectors) % 16 == 0;
    args.qmat = qmat;
    args.scale = scale;
    args.slot_active = slot_active;
    args.scores = scores;
    RETRACE_KERNEL_RETURN_IF_ERROR(LaunchScan(layout.dtype, tx, args, stream));
    pos += c.rows;
  }

  // 3. Exact selection.
  SelectKernel<<<num_cols, kSelectThreads, 0, stream>>>(scores, total_rows, k,
                                                        lists, selected);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "SelectKernel"));

  // 4. Breakdown of the returned rows.
  const int64_t entries = int64_t(num_cols) * lists * k;
  if (options.want_breakdown) {
    for (size_t o = 0; o < order.size(); ++o) {
      const StoreChunk& c = chunks[size_t(order[o])];
      BreakdownArgs args;
      args.vectors = c.vectors;
      args.norms = c.norms;
      args.rows = c.rows;
      args.pos0 = pos0[o];
      args.cs_count = cs_count;
      args.dim = layout.dim;
      args.ncols = ncols;
      args.k = k;
      args.lists = lists;
      args.entries = entries;
      args.selected = selected;
      args.qmat = qmat;
      args.scale = scale;
      args.slot_active = slot_active;
      args.breakdown = breakdown;
      RETRACE_KERNEL_RETURN_IF_ERROR(
          LaunchBreakdown(layout.dtype, args, stream));
    }
  }

  std::vector<unsigned long long> host_selected(static_cast<size_t>(entries));
  RETRACE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host_selected.data(), selected,
                      host_selected.size() * sizeof(unsigned long long),
                      cudaMemcpyDeviceToHost, stream));
  std::vector<float> host_breakdown;
  if (options.want_breakdown) {
    host_breakdown.resize(size_t(entries * cs_count));
    RETRACE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        host_breakdown.data(), breakdown, host_breakdown.size() * sizeof(float),
        cudaMemcpyDeviceToHost, stream));
  }
  RETRACE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));

  result->per_query.assign(size_t(nq), {});
  for (int col = 0; col < num_cols; ++col) {
    for (int list = 0; list < lists; ++list) {
      const bool top = list == 0;
      RankedList& ranked = result->per_query[size_t(col / 2)][size_t(col % 2)];
      std::vector<ScoredSample>& out = top ? ranked.top : ranked.bottom;
      out.resize(size_t(k));
      for (int i = 0; i < k; ++i) {
        const int64_t e = (int64_t(col) * lists + list) * k + i;
        const uint64_t c = host_selected[size_t(e)];
        const int64_t p = CandidateIndex(c);
        const size_t o = size_t(std::upper_bound(pos0.begin(), pos0.end(), p) -
                                pos0.begin()) -
                         1;
        out[size_t(i)].index =
            chunks[size_t(order[o])].first_index + (p - pos0[o]);
        out[size_t(i)].score = ScoreFromRankKey(CandidateKey(c), top);
        if (options.want_breakdown) {
          out[size_t(i)].breakdown.assign(
              host_breakdown.begin() + e * cs_count,
              host_breakdown.begin() + (e + 1) * cs_count);
        }
      }
    }
  }
  return KernelStatus::Ok();
}

// Device buffer freed on scope exit (self-test only).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  KernelStatus Allocate(size_t bytes) {
    return FromCudaError(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)),
                         "cudaMalloc");
  }
  KernelStatus Upload(const void* src, size_t bytes) {
    RETRACE_KERNEL_RETURN_IF_ERROR(Allocate(bytes));
    return FromCudaError(cudaMemcpy(ptr_, src, bytes, cudaMemcpyHostToDevice),
                         "cudaMemcpy");
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

// Backends agree within this error, relative to a bound on the sum of the
// absolute terms of a score; indices may differ only between scores closer
// than that.
constexpr float kSelfTestRelErr = 2e-6f;

KernelStatus SelfTestOne(DType dtype, int dim, int num_queries, uint64_t seed) {
  const StoreLayout layout{dtype, 2, 3, dim};
  const int64_t rows = 300;
  const int64_t cs = layout.SlotPairs();
  const int64_t values = rows * layout.RowValues();
  uint64_t state = seed;
  auto next = [&state]() {  // small LCG: uniform in [-1, 1)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return float(int64_t(state >> 40) - (int64_t{1} << 23)) / float(1 << 23);
  };
  std::vector<uint8_t> bytes(size_t(values * DTypeSize(dtype)));
  for (int64_t i = 0; i < values; ++i) {
    const float v = next();
    if (dtype == DType::kF32) {
      std::memcpy(&bytes[size_t(i) * 4], &v, 4);
    } else {
      const uint16_t h = dtype == DType::kF16 ? FloatToHalf(v) : FloatToBf16(v);
      std::memcpy(&bytes[size_t(i) * 2], &h, 2);
    }
  }
  std::vector<float> norms(size_t(rows * cs));
  for (float& n : norms) n = 1.5f + next();
  std::vector<float> raw(size_t(num_queries * layout.RowValues()));
  std::vector<float> unit(raw.size());
  for (float& x : raw) x = next();
  for (float& x : unit) x = next();
  std::vector<float> a_tr(size_t(num_queries * cs)), a_rt(a_tr.size());
  for (size_t i = 0; i < a_tr.size(); ++i) {
    a_tr[i] = i % 5 == 1 ? 0.0f : 1.0f + 0.5f * next();
    a_rt[i] = i % 7 == 2 ? 0.0f : 1.0f + 0.5f * next();
  }

  DeviceBuffer d_vectors, d_norms, d_raw, d_unit, d_tr, d_rt, d_scratch;
  RETRACE_KERNEL_RETURN_IF_ERROR(d_vectors.Upload(bytes.data(), bytes.size()));
  RETRACE_KERNEL_RETURN_IF_ERROR(
      d_norms.Upload(norms.data(), norms.size() * 4));
  RETRACE_KERNEL_RETURN_IF_ERROR(d_raw.Upload(raw.data(), raw.size() * 4));
  RETRACE_KERNEL_RETURN_IF_ERROR(d_unit.Upload(unit.data(), unit.size() * 4));
  RETRACE_KERNEL_RETURN_IF_ERROR(d_tr.Upload(a_tr.data(), a_tr.size() * 4));
  RETRACE_KERNEL_RETURN_IF_ERROR(d_rt.Upload(a_rt.data(), a_rt.size() * 4));

  // Two chunks, to exercise the position mapping.
  const int64_t split = 137;
  const size_t row_bytes = size_t(layout.RowValues() * DTypeSize(dtype));
  const std::vector<StoreChunk> host_chunks = {
      {bytes.data(), norms.data(), split, 0},
      {bytes.data() + split * row_bytes, norms.data() + split * cs,
       rows - split, split}};
  const std::vector<StoreChunk> device_chunks = {
      {d_vectors.get(), static_cast<const float*>(d_norms.get()), split, 0},
      {static_cast<const uint8_t*>(d_vectors.get()) + split * row_bytes,
       static_cast<const float*>(d_norms.get()) + split * cs, rows - split,
       split}};
  const QueryBatch host_q{num_queries, raw.data(), unit.data(), a_tr.data(),
                          a_rt.data()};
  const QueryBatch device_q{num_queries, static_cast<const float*>(d_raw.get()),
                            static_cast<const float*>(d_unit.get()),
                            static_cast<const float*>(d_tr.get()),
                            static_cast<const float*>(d_rt.get())};
  ScanOptions options;
  options.k = 9;
  options.want_bottom = true;
  options.want_breakdown = true;

  ScanResult want, got;
  RETRACE_KERNEL_RETURN_IF_ERROR(
      ScanCpu(layout, host_chunks, host_q, options, &want));
  size_t scratch_bytes = 0;
  RETRACE_KERNEL_RETURN_IF_ERROR(CudaScanScratchBytes(
      layout, device_chunks, num_queries, options, &scratch_bytes));
  RETRACE_KERNEL_RETURN_IF_ERROR(d_scratch.Allocate(scratch_bytes));
  RETRACE_KERNEL_RETURN_IF_ERROR(ScanCuda(layout, device_chunks, device_q,
                                          options, d_scratch.get(),
                                          scratch_bytes, nullptr, &got));

  // |score| <= sum_cs |a| * f * sum_d |u q| <= 2.5 * 2.5 * D * C * S.
  const float tol = kSelfTestRelErr * 6.25f * float(dim) * float(cs);
  const std::string where = std::string("scan self-test (") + DTypeName(dtype) +
                            ", D=" + std::to_string(dim) +
                            ", Q=" + std::to_string(num_queries) + "): ";
  for (int q = 0; q < num_queries; ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      const RankedList& w = want.Get(q, static_cast<Method>(m));
      const RankedList& g = got.Get(q, static_cast<Method>(m));
      for (int bottom = 0; bottom < 2; ++bottom) {
        const std::vector<ScoredSample>& wl = bottom ? w.bottom : w.top;
        const std::vector<ScoredSample>& gl = bottom ? g.bottom : g.top;
        if (wl.size() != gl.size()) {
          return KernelStatus::Internal(where + "list lengths differ");
        }
        for (size_t i = 0; i < wl.size(); ++i) {
          const std::string at = "query " + std::to_string(q) + " method " +
                                 std::to_string(m) +
                                 (bottom ? " bottom" : " top") + " rank " +
                                 std::to_string(i) + ": ";
          // Equal scores rank by rank; different indices are then near-ties.
          if (!(std::fabs(wl[i].score - gl[i].score) <= tol)) {
            return KernelStatus::Internal(
                where + at + "score " + std::to_string(gl[i].score) +
                " vs CPU " + std::to_string(wl[i].score));
          }
          if (gl[i].breakdown.size() != size_t(cs)) {
            return KernelStatus::Internal(where + at + "breakdown missing");
          }
          float sum = 0.0f;
          for (float x : gl[i].breakdown) sum += x;
          if (!(std::fabs(sum - gl[i].score) <= tol)) {
            return KernelStatus::Internal(where + at +
                                          "breakdown does not sum to score");
          }
          if (wl[i].index == gl[i].index) {
            for (int64_t j = 0; j < cs; ++j) {
              if (!(std::fabs(wl[i].breakdown[size_t(j)] -
                              gl[i].breakdown[size_t(j)]) <= tol)) {
                return KernelStatus::Internal(where + at +
                                              "breakdown differs from CPU");
              }
            }
          }
        }
      }
    }
  }
  return KernelStatus::Ok();
}

}  // namespace

KernelStatus CudaScanScratchBytes(const StoreLayout& layout,
                                  const std::vector<StoreChunk>& chunks,
                                  int32_t num_queries,
                                  const ScanOptions& options,
                                  size_t* scratch_bytes) {
  if (scratch_bytes == nullptr) {
    return KernelStatus::InvalidArgument("scratch_bytes pointer is null");
  }
  // The queries' pointers are not needed to size the scratch.
  static const float kPlaceholder = 0.0f;
  const QueryBatch shape{num_queries, &kPlaceholder, &kPlaceholder,
                         &kPlaceholder, &kPlaceholder};
  RETRACE_KERNEL_RETURN_IF_ERROR(ValidateScan(layout, chunks, shape, options));
  *scratch_bytes =
      PlanScratch(layout, TotalRows(chunks), num_queries, options).total;
  return KernelStatus::Ok();
}

KernelStatus ScanCuda(const StoreLayout& layout,
                      const std::vector<StoreChunk>& chunks,
                      const QueryBatch& queries, const ScanOptions& options,
                      void* scratch, size_t scratch_bytes, CUstream_st* stream,
                      ScanResult* result) {
  if (!CudaDeviceAvailable()) {
    return KernelStatus::Unavailable(CudaAvailabilityReason());
  }
  if (result == nullptr) {
    return KernelStatus::InvalidArgument("result pointer is null");
  }
  RETRACE_KERNEL_RETURN_IF_ERROR(
      ValidateScan(layout, chunks, queries, options));
  try {
    return ScanCudaImpl(layout, chunks, queries, options, scratch,
                        scratch_bytes, stream, result);
  } catch (const std::bad_alloc&) {
    return KernelStatus::OutOfMemory("scan: host allocation failed");
  }
}

KernelStatus CudaSelfTest() {
  if (!CudaDeviceAvailable()) {
    return KernelStatus::Unavailable(CudaAvailabilityReason());
  }
  try {
    // Vector loads (D multiple of 8), scalar loads (odd D), every dtype, and
    // the 1-, 4- and 32-column-group configurations.
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kF16, 64, 1, 1));
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kBF16, 37, 7, 2));
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kF32, 40, 64, 3));
  } catch (const std::bad_alloc&) {
    return KernelStatus::OutOfMemory("scan self-test: host allocation failed");
  }
  return KernelStatus::Ok();
}

}  // namespace retrace::kernels

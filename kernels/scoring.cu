// CUDA backend of the fused scoring scan; see scoring.h for the contract.
//
// Pipeline (all on the caller's stream, then one synchronization):
//  1. Queries are re-laid out once per call, per path: the fp32 path's
//     [C*S, D, 4*TX] fp32 matrix (PrepareQueryMatrixKernel), or the
//     tensor-core path's scaled hi and lo parts [C*S, Dpad, 16*F] in the
//     store's 16-bit type (PrepareTensorQueriesKernel); column = 2 * query +
//     method. PrepareWeightsKernel lays out the per-column slot weights and
//     flags the slots that any query uses. Both record the first non-finite
//     query value.
//  2. The scan (ScanKernel on the fp32 path, TensorScanKernel on the
//     tensor-core path): each block owns a tile of rows and all columns. For
//     every used slot it streams the tile's row pieces through shared memory
//     (each row is read from device memory once, with evict-first loads so
//     the query matrix stays in L2), accumulates the [rows, columns] dots of
//     the slot in registers, and folds them into the per-row scores with the
//     slot weights and norms. Only the final scores [2Q, N] leave the block:
//     the [N, slots, Q] partial dots never touch global memory.
//  3. The exact selection, a multi-block radix select: every score column is
//     cut into slices (kernels/scan_plan.h), one block per (slice, column),
//     so even Q = 1 fills the device. Three passes of 11, 11 and 10 bits over
//     the packed ranking keys (kernels/topk.h) find the k-th best key of each
//     column (histograms per block, summed in device memory, the digit chosen
//     by one small block per column); then every key above it is gathered,
//     and the lowest positions among the keys equal to it, counted per slice
//     so that each slice knows how many ties lower slices took. One block
//     per column sorts its k winners (bitonic sort in shared memory). Exact
//     for any k <= 4096 and any N.
//  4. The breakdown (optional) recomputes the per-slot terms of the returned
//     rows with the same operation sequence as the scan of their path.
//
// Determinism: on the fp32 path the dot of (row, column, slot) is one fmaf
// chain over d in order; on the tensor-core path it is one fixed sequence of
// MMA steps over d (hi then lo), each output element depending only on its
// own row and column; on both the slot terms are folded in cs order. So a
// score does not depend on the batch, the tiling or the chunking.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda_check.cuh"
#include "kernels/device.h"
#include "kernels/scan_plan.h"
#include "kernels/scoring.h"
#include "kernels/topk.h"

namespace retrace::kernels {
namespace {

constexpr int kScanThreads = 256;
constexpr int kTileK = 32;           // store values per row piece and k-step
constexpr int kWeightThreads = 128;  // >= the largest padded column count
constexpr int kSelectThreads = 512;  // histogram and gather blocks
constexpr int kChooseThreads = 256;  // one block per column and list
constexpr int kSortThreads = 1024;
constexpr int kSortCapacity = kMaxTopK;  // a power of two
constexpr unsigned long long kNoBadValue = ~0ull;
constexpr int kPrepareBlocks = 1024;

static_assert((kSortCapacity & (kSortCapacity - 1)) == 0, "bitonic sort size");
static_assert(kRadixBins % kChooseThreads == 0, "bins per choose thread");
static_assert(4 * 32 <= kWeightThreads && 2 * kMaxQueries <= kWeightThreads,
              "PrepareWeightsKernel covers every column with one block");

// Tensor-core path.
constexpr int kTcThreads = 256;  // 8 warps
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kTcChunk = 64;  // store values per row piece in shared memory
constexpr int kTcLdA = kTcChunk + 8;  // padded row of the shared tile
constexpr int kTcStageLd = 20;        // padded row of a warp's 16x16 stage
constexpr int kTcPrepareThreads = 256;
constexpr int kTcBreakdownWarps = 4;
// Each query vector is scaled so that its largest value lies in
// [2^14, 2^15): its hi part cannot overflow fp16 and its lo part stays
// normal down to 2^-17 of the largest value.
constexpr int kTcQueryExponent = 14;
// Keeps 2^shift and 2^-shift normal floats. Only vectors whose largest value
// is below 2^-112 reach it; they stay unscaled beyond 2^126 and cannot
// overflow. (The lower bound is never reached: 14 - 127 = -113.)
constexpr int kTcMaxShift = 126;
static_assert(kTcChunk % kTensorFragment == 0, "whole MMA steps per chunk");

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

// ---------------------------------------------------------------------------
// Exact multi-block selection.

// Per (column, list): the key prefix found so far, its mask, how many of the
// k still have to come from keys matching the prefix, and the count of
// entries taken above the final threshold.
struct RadixState {
  uint32_t prefix;
  uint32_t mask;
  uint32_t remaining;
  uint32_t taken;
};

struct SelectArgs {
  const float* scores;  // [num_cols, total_rows]
  int64_t total_rows;
  int64_t slice_rows;
  int64_t slices;
  int32_t k;
  int32_t lists;
  RadixState* state;             // [num_cols * lists]
  unsigned* histogram;           // [num_cols * lists, kRadixBins]
  unsigned* tie_counts;          // [num_cols * lists, slices]
  unsigned long long* selected;  // [num_cols * lists, k]
};

// One thread per (column, list).
__global__ void SelectInitKernel(RadixState* state, int count, int k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) state[i] = RadixState{0u, 0u, uint32_t(k), 0u};
}

// Block (slice, column): the threads stride over the slice's positions and
// count, per list, the digits of the keys that match the prefix so far.
__global__ void __launch_bounds__(kSelectThreads)
    SelectHistogramKernel(SelectArgs a, int shift, uint32_t digit_mask) {
  __shared__ unsigned hist[2][kRadixBins];
  const int tid = threadIdx.x;
  const int col = blockIdx.y;
  for (int b = tid; b < 2 * kRadixBins; b += kSelectThreads) {
    hist[b / kRadixBins][b % kRadixBins] = 0;
  }
  uint32_t prefix[2] = {0u, 0u}, mask[2] = {0u, 0u};
  for (int l = 0; l < a.lists; ++l) {
    prefix[l] = a.state[col * a.lists + l].prefix;
    mask[l] = a.state[col * a.lists + l].mask;
  }
  __syncthreads();
  const float* column = a.scores + int64_t(col) * a.total_rows;
  const int64_t begin = int64_t(blockIdx.x) * a.slice_rows;
  const int64_t end =
      a.total_rows < begin + a.slice_rows ? a.total_rows : begin + a.slice_rows;
  for (int64_t p = begin + tid; p < end; p += kSelectThreads) {
    const float s = column[p];
    for (int l = 0; l < a.lists; ++l) {
      const uint32_t key = RankKey(s, l == 0);
      if ((key & mask[l]) == prefix[l]) {
        atomicAdd(&hist[l][(key >> shift) & digit_mask], 1u);
      }
    }
  }
  __syncthreads();
  for (int l = 0; l < a.lists; ++l) {
    unsigned* global = a.histogram + int64_t(col * a.lists + l) * kRadixBins;
    for (int b = tid; b < kRadixBins; b += kSelectThreads) {
      if (hist[l][b] != 0) atomicAdd(&global[b], hist[l][b]);
    }
  }
}

// Block (column, list): finds the digit that holds the `remaining`-th best
// matching key, extends the prefix with it, and clears the histogram for the
// next pass. Thread t scans bins from the top: [kRadixBins - 8(t+1), 8t).
__global__ void __launch_bounds__(kChooseThreads)
    SelectChooseKernel(SelectArgs a, int shift, uint32_t digit_mask) {
  constexpr int kPer = kRadixBins / kChooseThreads;
  __shared__ unsigned hist[kRadixBins];
  __shared__ unsigned partial[kChooseThreads];
  const int tid = threadIdx.x;
  const int cl = blockIdx.x;
  unsigned* global = a.histogram + int64_t(cl) * kRadixBins;
  const uint32_t remaining = a.state[cl].remaining;
  for (int b = tid; b < kRadixBins; b += kChooseThreads) {
    hist[b] = global[b];
    global[b] = 0;
  }
  __syncthreads();
  const int top = kRadixBins - 1 - tid * kPer;
  unsigned sum = 0;
  for (int i = 0; i < kPer; ++i) sum += hist[top - i];
  partial[tid] = sum;
  __syncthreads();
  // Inclusive scan over the threads, i.e. from the highest bins down.
  for (int offset = 1; offset < kChooseThreads; offset <<= 1) {
    const unsigned v = tid >= offset ? partial[tid - offset] : 0u;
    __syncthreads();
    partial[tid] += v;
    __syncthreads();
  }
  const unsigned before = partial[tid] - sum;
  if (before < remaining && before + sum >= remaining) {
    unsigned above = before;
    for (int i = 0; i < kPer; ++i) {
      const int b = top - i;
      if (above + hist[b] >= remaining) {
        a.state[cl].prefix |= uint32_t(b) << shift;
        a.state[cl].mask |= digit_mask << shift;
        a.state[cl].remaining = remaining - above;
        break;
      }
      above += hist[b];
    }
  }
}

// Block (slice, column): appends every key better than the column's k-th
// best to its selection (in any order) and counts, per list, the slice's
// keys equal to it.
__global__ void __launch_bounds__(kSelectThreads)
    SelectGatherKernel(SelectArgs a) {
  __shared__ unsigned ties[2];
  const int tid = threadIdx.x;
  const int col = blockIdx.y;
  if (tid < 2) ties[tid] = 0;
  uint32_t threshold[2] = {0u, 0u};
  for (int l = 0; l < a.lists; ++l) {
    threshold[l] = a.state[col * a.lists + l].prefix;
  }
  __syncthreads();
  const float* column = a.scores + int64_t(col) * a.total_rows;
  const int64_t begin = int64_t(blockIdx.x) * a.slice_rows;
  const int64_t end =
      a.total_rows < begin + a.slice_rows ? a.total_rows : begin + a.slice_rows;
  for (int64_t p = begin + tid; p < end; p += kSelectThreads) {
    const float s = column[p];
    for (int l = 0; l < a.lists; ++l) {
      const uint32_t key = RankKey(s, l == 0);
      if (key > threshold[l]) {
        const int cl = col * a.lists + l;
        const unsigned at = atomicAdd(&a.state[cl].taken, 1u);
        a.selected[int64_t(cl) * a.k + at] = PackCandidate(key, p);
      } else if (key == threshold[l]) {
        atomicAdd(&ties[l], 1u);
      }
    }
  }
  __syncthreads();
  if (tid < a.lists) {
    a.tie_counts[int64_t(col * a.lists + tid) * a.slices + blockIdx.x] =
        ties[tid];
  }
}

// Block (slice, column): the keys equal to the threshold fill the last
// `remaining` places of the selection in position order. The ties of lower
// slices come first; within the slice the block walks its positions in
// order, a round of kSelectThreads at a time, ranking the ties with ballots.
__global__ void __launch_bounds__(kSelectThreads)
    SelectTiesKernel(SelectArgs a) {
  __shared__ unsigned warp_counts[kSelectThreads / 32];
  __shared__ unsigned long long s_offset;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int col = blockIdx.y;
  const float* column = a.scores + int64_t(col) * a.total_rows;
  const int64_t begin = int64_t(blockIdx.x) * a.slice_rows;
  const int64_t end =
      a.total_rows < begin + a.slice_rows ? a.total_rows : begin + a.slice_rows;
  for (int l = 0; l < a.lists; ++l) {
    const bool top = l == 0;
    const int cl = col * a.lists + l;
    const uint32_t threshold = a.state[cl].prefix;
    const uint32_t remaining = a.state[cl].remaining;
    const uint32_t above = uint32_t(a.k) - remaining;
    const unsigned* counts = a.tie_counts + int64_t(cl) * a.slices;
    // Ties in the slices before this one.
    unsigned long long mine = 0;
    for (int64_t s = tid; s < blockIdx.x; s += kSelectThreads)
      mine += counts[s];
    for (int o = 16; o > 0; o >>= 1)
      mine += __shfl_down_sync(0xffffffffu, mine, o);
    if (tid == 0) s_offset = 0;
    __syncthreads();
    if (lane == 0 && mine != 0) atomicAdd(&s_offset, mine);
    __syncthreads();
    const unsigned long long offset = s_offset;
    __syncthreads();  // s_offset is reset for the next list
    if (offset >= remaining || counts[blockIdx.x] == 0) continue;
    unsigned long long taken = 0;  // uniform across the block
    for (int64_t base = begin; base < end && offset + taken < remaining;
         base += kSelectThreads) {
      const int64_t p = base + tid;
      const bool flag = p < end && RankKey(column[p], top) == threshold;
      const unsigned ballot = __ballot_sync(0xffffffffu, flag);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      unsigned before = __popc(ballot & ((1u << lane) - 1u));
      unsigned total = 0;
      for (int w = 0; w < kSelectThreads / 32; ++w) {
        if (w < warp) before += warp_counts[w];
        total += warp_counts[w];
      }
      const unsigned long long rank = offset + taken + before;
      if (flag && rank < remaining) {
        a.selected[int64_t(cl) * a.k + above + rank] =
            PackCandidate(threshold, p);
      }
      taken += total;
      __syncthreads();  // warp_counts is rewritten in the next round
    }
  }
}

// Block (column, list): sorts its k selected candidates, best first.
__global__ void __launch_bounds__(kSortThreads) SelectSortKernel(SelectArgs a) {
  __shared__ unsigned long long sel[kSortCapacity];
  const int tid = threadIdx.x;
  unsigned long long* list = a.selected + int64_t(blockIdx.x) * a.k;
  int n = 1;
  while (n < a.k) n <<= 1;
  for (int i = tid; i < n; i += kSortThreads) sel[i] = i < a.k ? list[i] : 0ull;
  __syncthreads();
  // Bitonic sort, descending: larger packed candidates are better.
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = tid; i < n; i += kSortThreads) {
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
  for (int i = tid; i < a.k; i += kSortThreads) list[i] = sel[i];
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
// Tensor-core path.

template <DType DT>
struct TensorElem;

template <>
struct TensorElem<DType::kF16> {
  using T = __half;
  __device__ static T FromFloat(float x) { return __float2half_rn(x); }
  __device__ static float ToFloat(T h) { return __half2float(h); }
};

template <>
struct TensorElem<DType::kBF16> {
  using T = __nv_bfloat16;
  __device__ static T FromFloat(float x) { return __float2bfloat16_rn(x); }
  __device__ static float ToFloat(T h) { return __bfloat162float(h); }
};

// 2^e for |e| <= kTcMaxShift, exactly.
__device__ float ExactPow2(int e) { return __int_as_float((127 + e) << 23); }

// Block (slot pair, column): scales the column's query vector of that slot
// so its largest value lies in [2^14, 2^15) and splits it into hi + lo; the
// threads stride over d. Padding columns and d >= dim hold zeros.
template <DType DT>
__global__ void __launch_bounds__(kTcPrepareThreads)
    PrepareTensorQueriesKernel(const float* raw, const float* unit,
                               int num_queries, int64_t cs_count, int dim,
                               int64_t dpad, int ncp,
                               typename TensorElem<DT>::T* qhi,
                               typename TensorElem<DT>::T* qlo,
                               float* inv_scale, unsigned long long* bad) {
  using E = TensorElem<DT>;
  __shared__ float warp_max[kTcPrepareThreads / 32];
  __shared__ int s_shift;
  const int tid = threadIdx.x;
  const int col = int(blockIdx.x % unsigned(ncp));
  const int64_t cs = int64_t(blockIdx.x / unsigned(ncp));
  const float* src = nullptr;
  unsigned long long code = 0;
  if (col < 2 * num_queries) {
    const int q = col / 2, m = col % 2;
    src = (m == 0 ? raw : unit) + (q * cs_count + cs) * dim;
    code = (unsigned long long)((q * cs_count + cs) * 4 + m);
  }
  float mx = 0.0f;
  if (src != nullptr) {
    for (int d = tid; d < dim; d += kTcPrepareThreads) {
      const float v = src[d];
      if (isfinite(v)) {
        mx = fmaxf(mx, fabsf(v));
      } else {
        atomicMin(bad, code);
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_down_sync(0xffffffffu, mx, o));
  }
  if ((tid & 31) == 0) warp_max[tid >> 5] = mx;
  __syncthreads();
  if (tid == 0) {
    float m = 0.0f;
    for (int w = 0; w < kTcPrepareThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
    int shift = 0;
    if (m > 0.0f) {
      shift = min(kTcMaxShift, max(-kTcMaxShift, kTcQueryExponent - ilogbf(m)));
    }
    s_shift = shift;
    inv_scale[cs * ncp + col] = ExactPow2(-shift);
  }
  __syncthreads();
  const float scale = ExactPow2(s_shift);
  for (int64_t d = tid; d < dpad; d += kTcPrepareThreads) {
    float v = src != nullptr && d < dim ? src[d] : 0.0f;
    if (!isfinite(v)) v = 0.0f;
    const float x = v * scale;
    const typename E::T hi = E::FromFloat(x);
    const typename E::T lo = E::FromFloat(x - E::ToFloat(hi));
    const int64_t at = (cs * dpad + d) * ncp + col;
    qhi[at] = hi;
    qlo[at] = lo;
  }
}

struct TensorScanArgs {
  const void* vectors;  // chunk rows, device
  const float* norms;
  int64_t rows;
  int64_t pos0;        // position of row 0 in the scores buffer
  int64_t total_rows;  // length of one scores column
  int64_t cs_count;
  int32_t dim;
  int32_t dpad;       // dim rounded up to 16
  int32_t ncp;        // padded columns: 16 * fragments
  int32_t num_cols;   // 2Q real columns
  bool vector_loads;  // 16-byte loads are aligned (dim % 8 == 0)
  const void* qhi;    // [cs, dpad, ncp]
  const void* qlo;
  const float* inv_scale;  // [cs, ncp]
  const float* scale;      // [cs, ncp] slot weights
  const int* slot_active;
  float* scores;  // [num_cols, total_rows]
};

// Eight 16-bit store values of one row piece (zeros past the chunk or dim).
__device__ uint4 LoadPiece16(const uint16_t* vec, int64_t row, int64_t rows,
                             int64_t row_values, int64_t cs, int dim, int d,
                             bool vector_loads) {
  uint4 out = make_uint4(0u, 0u, 0u, 0u);
  if (row >= rows || d >= dim) return out;
  const uint16_t* p = vec + row * row_values + cs * dim + d;
  if (vector_loads) return __ldcs(reinterpret_cast<const uint4*>(p));
  uint32_t h[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = d + e < dim ? uint32_t(p[e]) : 0u;
  out.x = h[0] | (h[1] << 16);
  out.y = h[2] | (h[3] << 16);
  out.z = h[4] | (h[5] << 16);
  out.w = h[6] | (h[7] << 16);
  return out;
}

__device__ int64_t NextActiveSlot(const int* slot_active, int64_t cs,
                                  int64_t cs_count) {
  while (cs < cs_count && !slot_active[cs]) ++cs;
  return cs;
}

// Block b scores rows [b*BM, (b+1)*BM) of the chunk against every column.
// Warp w owns the 16 rows at 16 * (w % RW) and the WC column fragments from
// (w / RW) * WC; lane l keeps the scores of row l % 16 and, in each
// fragment, of columns l / 16 + 2i (i < 8). Each step stages one 64-value
// piece of every row of the tile in shared memory (the next one is loaded
// into registers meanwhile) and runs 4 MMA steps of 16 values over it.
template <DType DT, int CW, int WC>
__global__ void __launch_bounds__(kTcThreads)
    TensorScanKernel(TensorScanArgs a) {
  using namespace nvcuda;
  using T = typename TensorElem<DT>::T;
  constexpr int kRw = kTcWarps / CW;
  constexpr int kBm = 16 * kRw;
  constexpr int kPiecesPerRow = kTcChunk / 8;
  constexpr int kPieces = kBm * kPiecesPerRow;
  constexpr int kPiecesPerThread = kPieces / kTcThreads;
  static_assert(kPieces % kTcThreads == 0, "whole pieces per thread");
  __shared__ __align__(32) uint16_t sa[kBm * kTcLdA];
  __shared__ __align__(32) float stage[kTcWarps][16 * kTcStageLd];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int wr = warp % kRw, cg = warp / kRw;
  const int64_t row0 = int64_t(blockIdx.x) * kBm;
  const int64_t row_values = a.cs_count * a.dim;
  const uint16_t* vec = static_cast<const uint16_t*>(a.vectors);
  const T* qhi = static_cast<const T*>(a.qhi);
  const T* qlo = static_cast<const T*>(a.qlo);
  const int chunks = (a.dim + kTcChunk - 1) / kTcChunk;
  const int my_row = lane % 16;
  const int64_t row = row0 + wr * 16 + my_row;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[WC];
  float score[WC][8];
#pragma unroll
  for (int j = 0; j < WC; ++j) {
    wmma::fill_fragment(acc[j], 0.0f);
#pragma unroll
    for (int i = 0; i < 8; ++i) score[j][i] = 0.0f;
  }

  uint4 piece[kPiecesPerThread];
  auto load = [&](int64_t cs, int chunk) {
#pragma unroll
    for (int i = 0; i < kPiecesPerThread; ++i) {
      const int v = tid + i * kTcThreads;
      const int r = v / kPiecesPerRow, c = v % kPiecesPerRow;
      piece[i] = LoadPiece16(vec, row0 + r, a.rows, row_values, cs, a.dim,
                             chunk * kTcChunk + c * 8, a.vector_loads);
    }
  };

  int64_t cs = NextActiveSlot(a.slot_active, 0, a.cs_count);
  int chunk = 0;
  if (cs < a.cs_count) load(cs, 0);
  while (cs < a.cs_count) {
    __syncthreads();  // the previous step has finished reading sa
#pragma unroll
    for (int i = 0; i < kPiecesPerThread; ++i) {
      const int v = tid + i * kTcThreads;
      const int r = v / kPiecesPerRow, c = v % kPiecesPerRow;
      *reinterpret_cast<uint4*>(&sa[r * kTcLdA + c * 8]) = piece[i];
    }
    __syncthreads();
    int64_t next_cs = cs;
    int next_chunk = chunk + 1;
    if (next_chunk == chunks) {
      next_cs = NextActiveSlot(a.slot_active, cs + 1, a.cs_count);
      next_chunk = 0;
    }
    if (next_cs < a.cs_count) load(next_cs, next_chunk);

#pragma unroll
    for (int ks = 0; ks < kTcChunk / 16; ++ks) {
      const int d = chunk * kTcChunk + ks * 16;
      if (d >= a.dpad) break;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(
          fa, reinterpret_cast<const T*>(sa) + wr * 16 * kTcLdA + ks * 16,
          kTcLdA);
#pragma unroll
      for (int j = 0; j < WC; ++j) {
        const int64_t at =
            (cs * a.dpad + d) * a.ncp + int64_t(cg * WC + j) * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, qhi + at, unsigned(a.ncp));
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
        wmma::load_matrix_sync(fb, qlo + at, unsigned(a.ncp));
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }

    if (chunk == chunks - 1) {
      // The slot's dots are complete: fold them into the scores.
      float* st = stage[warp];
      const float norm = row < a.rows ? a.norms[row * a.cs_count + cs] : 0.0f;
#pragma unroll
      for (int j = 0; j < WC; ++j) {
        wmma::store_matrix_sync(st, acc[j], kTcStageLd, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int cc = lane / 16 + 2 * i;
          const int col = (cg * WC + j) * 16 + cc;
          const int64_t wi = cs * a.ncp + col;
          const float dot = st[my_row * kTcStageLd + cc] * a.inv_scale[wi];
          const float w = a.scale[wi];
          // Even columns are TracIn, as on the fp32 path.
          score[j][i] = col % 2 == 0 ? fmaf(w * norm, dot, score[j][i])
                                     : fmaf(w, dot, score[j][i]);
        }
        __syncwarp();  // the stage is rewritten for the next fragment
        wmma::fill_fragment(acc[j], 0.0f);
      }
    }
    cs = next_cs;
    chunk = next_chunk;
  }
  if (row >= a.rows) return;
#pragma unroll
  for (int j = 0; j < WC; ++j) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = (cg * WC + j) * 16 + lane / 16 + 2 * i;
      if (col < a.num_cols) {
        a.scores[col * a.total_rows + a.pos0 + row] = score[j][i];
      }
    }
  }
}

struct TensorBreakdownArgs {
  const void* vectors;
  const float* norms;
  int64_t rows;
  int64_t pos0;
  int64_t cs_count;
  int32_t dim;
  int32_t dpad;
  int32_t ncp;
  int32_t k;
  int32_t lists;
  int64_t entries;  // num_cols * lists * k
  const unsigned long long* selected;
  const void* qhi;
  const void* qlo;
  const float* inv_scale;
  const float* scale;
  const int* slot_active;
  float* breakdown;  // [entries, cs_count]
};

// One warp per returned entry (entries whose row lies outside this chunk are
// left to the launch for their own chunk). For each used slot the warp
// repeats the scan's MMA sequence for the entry's row, placed at the same
// row of a 16-row fragment as in the scan (row % 16, since scan tiles start
// at multiples of 16) and with the same column fragment, so the terms are
// the very ones the score folded.
template <DType DT>
__global__ void __launch_bounds__(kTcBreakdownWarps * 32)
    TensorBreakdownKernel(TensorBreakdownArgs a) {
  using namespace nvcuda;
  using T = typename TensorElem<DT>::T;
  __shared__ __align__(32) uint16_t tile[kTcBreakdownWarps][16 * 16];
  __shared__ __align__(32) float stage[kTcBreakdownWarps][16 * 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t e = int64_t(blockIdx.x) * kTcBreakdownWarps + warp;
  if (e >= a.entries) return;  // the whole warp
  const int64_t pos = CandidateIndex(a.selected[e]);
  if (pos < a.pos0 || pos >= a.pos0 + a.rows) return;
  const int64_t row = pos - a.pos0;
  const int rpos = int(row % 16);
  const int col = int(e / (int64_t(a.lists) * a.k));
  const int frag = col / 16, cc = col % 16;
  uint16_t* my_tile = tile[warp];
  float* st = stage[warp];
  for (int i = lane; i < 16 * 16; i += 32) my_tile[i] = 0;
  __syncwarp();
  const uint16_t* u = static_cast<const uint16_t*>(a.vectors);
  const T* qhi = static_cast<const T*>(a.qhi);
  const T* qlo = static_cast<const T*>(a.qlo);
  for (int64_t cs = 0; cs < a.cs_count; ++cs) {
    float out = 0.0f;
    if (a.slot_active[cs]) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      const uint16_t* src = u + (row * a.cs_count + cs) * a.dim;
      for (int d0 = 0; d0 < a.dpad; d0 += 16) {
        if (lane < 16) {
          const int d = d0 + lane;
          my_tile[rpos * 16 + lane] = d < a.dim ? src[d] : uint16_t(0);
        }
        __syncwarp();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(my_tile), 16);
        const int64_t at = (cs * a.dpad + d0) * a.ncp + int64_t(frag) * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, qhi + at, unsigned(a.ncp));
        wmma::mma_sync(acc, fa, fb, acc);
        wmma::load_matrix_sync(fb, qlo + at, unsigned(a.ncp));
        wmma::mma_sync(acc, fa, fb, acc);
        __syncwarp();  // the tile is rewritten in the next step
      }
      wmma::store_matrix_sync(st, acc, 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t wi = cs * a.ncp + col;
      const float dot = st[rpos * 16 + cc] * a.inv_scale[wi];
      const float f = col % 2 == 0 ? a.norms[row * a.cs_count + cs] : 1.0f;
      out = (a.scale[wi] * f) * dot;
      __syncwarp();
    }
    if (lane == 0) a.breakdown[e * a.cs_count + cs] = out;
  }
}

// ---------------------------------------------------------------------------
// Host side.

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

template <DType DT, int CW, int WC>
KernelStatus LaunchTensorScanTyped(const TensorScanArgs& args,
                                   cudaStream_t stream) {
  constexpr int64_t kBm = int64_t(16) * (kTcWarps / CW);
  const int64_t blocks = (args.rows + kBm - 1) / kBm;
  if (blocks > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument(
        "chunk has too many rows for one launch");
  }
  TensorScanKernel<DT, CW, WC>
      <<<unsigned(blocks), kTcThreads, 0, stream>>>(args);
  return CheckLaunch(stream, "TensorScanKernel");
}

// Column fragments -> warps per column group (CW) and fragments per warp
// (WC): each warp keeps at most 4 accumulator fragments, and blocks cover
// 128 rows (64 with 8 fragments).
template <DType DT>
KernelStatus LaunchTensorScanForDType(int fragments, const TensorScanArgs& args,
                                      cudaStream_t stream) {
  switch (fragments) {
    case 1:
      return LaunchTensorScanTyped<DT, 1, 1>(args, stream);
    case 2:
      return LaunchTensorScanTyped<DT, 1, 2>(args, stream);
    case 4:
      return LaunchTensorScanTyped<DT, 1, 4>(args, stream);
    case 8:
      return LaunchTensorScanTyped<DT, 2, 4>(args, stream);
  }
  return KernelStatus::Internal("no tensor-core scan configuration for " +
                                std::to_string(fragments) + " fragments");
}

KernelStatus LaunchTensorScan(DType dtype, int fragments,
                              const TensorScanArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF16:
      return LaunchTensorScanForDType<DType::kF16>(fragments, args, stream);
    case DType::kBF16:
      return LaunchTensorScanForDType<DType::kBF16>(fragments, args, stream);
    case DType::kF32:
      break;
  }
  return KernelStatus::Internal("tensor-core scan of an F32 store");
}

KernelStatus LaunchTensorPrepare(DType dtype, const QueryBatch& queries,
                                 int64_t cs_count, int dim, int64_t dpad,
                                 int ncp, void* qhi, void* qlo,
                                 float* inv_scale, unsigned long long* bad,
                                 cudaStream_t stream) {
  const int64_t blocks = cs_count * ncp;
  if (blocks > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument("too many (checkpoint, slot) pairs");
  }
  switch (dtype) {
    case DType::kF16:
      PrepareTensorQueriesKernel<DType::kF16>
          <<<unsigned(blocks), kTcPrepareThreads, 0, stream>>>(
              queries.raw, queries.unit, queries.num_queries, cs_count, dim,
              dpad, ncp, static_cast<__half*>(qhi), static_cast<__half*>(qlo),
              inv_scale, bad);
      break;
    case DType::kBF16:
      PrepareTensorQueriesKernel<DType::kBF16>
          <<<unsigned(blocks), kTcPrepareThreads, 0, stream>>>(
              queries.raw, queries.unit, queries.num_queries, cs_count, dim,
              dpad, ncp, static_cast<__nv_bfloat16*>(qhi),
              static_cast<__nv_bfloat16*>(qlo), inv_scale, bad);
      break;
    case DType::kF32:
      return KernelStatus::Internal("tensor-core queries for an F32 store");
  }
  return CheckLaunch(stream, "PrepareTensorQueriesKernel");
}

KernelStatus LaunchTensorBreakdown(DType dtype, const TensorBreakdownArgs& args,
                                   cudaStream_t stream) {
  const int64_t blocks =
      (args.entries + kTcBreakdownWarps - 1) / kTcBreakdownWarps;
  if (blocks > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument("breakdown too large for one launch");
  }
  switch (dtype) {
    case DType::kF16:
      TensorBreakdownKernel<DType::kF16>
          <<<unsigned(blocks), kTcBreakdownWarps * 32, 0, stream>>>(args);
      break;
    case DType::kBF16:
      TensorBreakdownKernel<DType::kBF16>
          <<<unsigned(blocks), kTcBreakdownWarps * 32, 0, stream>>>(args);
      break;
    case DType::kF32:
      return KernelStatus::Internal("tensor-core breakdown of an F32 store");
  }
  return CheckLaunch(stream, "TensorBreakdownKernel");
}

// The exact top-k (and bottom-k) of every score column into
// args.selected, sorted best first.
KernelStatus RunSelect(const SelectArgs& args, int num_cols,
                       cudaStream_t stream) {
  const int lists_total = num_cols * args.lists;
  if (args.slices > 65535 || num_cols > 65535) {
    return KernelStatus::Internal("selection grid too large");
  }
  SelectInitKernel<<<(lists_total + 255) / 256, 256, 0, stream>>>(
      args.state, lists_total, args.k);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "SelectInitKernel"));
  RETRACE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
      args.histogram, 0, size_t(lists_total) * kRadixBins * sizeof(unsigned),
      stream));
  const dim3 grid(unsigned(args.slices), unsigned(num_cols));
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const uint32_t digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
    SelectHistogramKernel<<<grid, kSelectThreads, 0, stream>>>(args, shift,
                                                               digit_mask);
    RETRACE_KERNEL_RETURN_IF_ERROR(
        CheckLaunch(stream, "SelectHistogramKernel"));
    SelectChooseKernel<<<unsigned(lists_total), kChooseThreads, 0, stream>>>(
        args, shift, digit_mask);
    RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "SelectChooseKernel"));
  }
  SelectGatherKernel<<<grid, kSelectThreads, 0, stream>>>(args);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "SelectGatherKernel"));
  SelectTiesKernel<<<grid, kSelectThreads, 0, stream>>>(args);
  RETRACE_KERNEL_RETURN_IF_ERROR(CheckLaunch(stream, "SelectTiesKernel"));
  SelectSortKernel<<<unsigned(lists_total), kSortThreads, 0, stream>>>(args);
  return CheckLaunch(stream, "SelectSortKernel");
}

KernelStatus ScanCudaImpl(const StoreLayout& layout,
                          const std::vector<StoreChunk>& chunks,
                          const QueryBatch& queries, const ScanOptions& options,
                          CudaScanPath path, void* scratch,
                          size_t scratch_bytes, cudaStream_t stream,
                          ScanResult* result) {
  const bool tensor = path == CudaScanPath::kTensorCore;
  const int nq = queries.num_queries;
  const int tx = Fp32ColumnGroups(nq);
  const int fragments = TensorColumnFragments(nq);
  const int num_cols = 2 * nq;
  const int lists = options.want_bottom ? 2 : 1;
  const int k = options.k;
  const int64_t cs_count = layout.SlotPairs();
  const int64_t total_rows = TotalRows(chunks);
  const int64_t dpad = TensorPaddedDim(layout.dim);
  const ScratchPlan plan =
      PlanScanScratch(layout, total_rows, nq, options, path);
  const int ncols = plan.padded_columns;
  if (scratch == nullptr || scratch_bytes < plan.total) {
    return KernelStatus::InvalidArgument(
        "scan scratch of " + std::to_string(scratch_bytes) + " bytes, " +
        std::to_string(plan.total) + " needed (CudaScanScratchBytes)");
  }
  if (cs_count > 0x7fffffffLL) {
    return KernelStatus::InvalidArgument("too many (checkpoint, slot) pairs");
  }
  char* base = static_cast<char*>(scratch);
  float* qmat = reinterpret_cast<float*>(base + plan.qmat);
  void* qhi = base + plan.qhi;
  void* qlo = base + plan.qlo;
  float* inv_scale = reinterpret_cast<float*>(base + plan.inv_scale);
  float* scale = reinterpret_cast<float*>(base + plan.scale);
  int* slot_active = reinterpret_cast<int*>(base + plan.slot_active);
  auto* bad = reinterpret_cast<unsigned long long*>(base + plan.bad);
  float* scores = reinterpret_cast<float*>(base + plan.scores);
  auto* selected = reinterpret_cast<unsigned long long*>(base + plan.selected);
  float* breakdown = reinterpret_cast<float*>(base + plan.breakdown);

  // 1. Queries.
  RETRACE_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(bad, 0xff, sizeof(*bad), stream));
  if (tensor) {
    RETRACE_KERNEL_RETURN_IF_ERROR(
        LaunchTensorPrepare(layout.dtype, queries, cs_count, layout.dim, dpad,
                            ncols, qhi, qlo, inv_scale, bad, stream));
  } else {
    const int64_t qmat_values = cs_count * layout.dim * ncols;
    const int prep_blocks = int(std::min<int64_t>(
        kPrepareBlocks, (qmat_values + kScanThreads - 1) / kScanThreads));
    PrepareQueryMatrixKernel<<<prep_blocks, kScanThreads, 0, stream>>>(
        queries.raw, queries.unit, nq, cs_count, layout.dim, ncols, qmat, bad);
    RETRACE_KERNEL_RETURN_IF_ERROR(
        CheckLaunch(stream, "PrepareQueryMatrixKernel"));
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
    const bool vector_loads = layout.dim % vec_values == 0 &&
                              reinterpret_cast<uintptr_t>(c.vectors) % 16 == 0;
    if (tensor) {
      TensorScanArgs args;
      args.vectors = c.vectors;
      args.norms = c.norms;
      args.rows = c.rows;
      args.pos0 = pos;
      args.total_rows = total_rows;
      args.cs_count = cs_count;
      args.dim = layout.dim;
      args.dpad = int32_t(dpad);
      args.ncp = ncols;
      args.num_cols = num_cols;
      args.vector_loads = vector_loads;
      args.qhi = qhi;
      args.qlo = qlo;
      args.inv_scale = inv_scale;
      args.scale = scale;
      args.slot_active = slot_active;
      args.scores = scores;
      RETRACE_KERNEL_RETURN_IF_ERROR(
          LaunchTensorScan(layout.dtype, fragments, args, stream));
    } else {
      ScanArgs args;
      args.vectors = c.vectors;
      args.norms = c.norms;
      args.rows = c.rows;
      args.pos0 = pos;
      args.total_rows = total_rows;
      args.cs_count = cs_count;
      args.dim = layout.dim;
      args.num_cols = num_cols;
      args.vector_loads = vector_loads;
      args.qmat = qmat;
      args.scale = scale;
      args.slot_active = slot_active;
      args.scores = scores;
      RETRACE_KERNEL_RETURN_IF_ERROR(
          LaunchScan(layout.dtype, tx, args, stream));
    }
    pos += c.rows;
  }

  // 3. Exact selection over the whole device.
  SelectArgs select;
  select.scores = scores;
  select.total_rows = total_rows;
  select.slice_rows = SelectSliceRows(total_rows);
  select.slices = SelectSlices(total_rows);
  select.k = k;
  select.lists = lists;
  select.state = reinterpret_cast<RadixState*>(base + plan.radix_state);
  select.histogram = reinterpret_cast<unsigned*>(base + plan.histogram);
  select.tie_counts = reinterpret_cast<unsigned*>(base + plan.tie_counts);
  select.selected = selected;
  RETRACE_KERNEL_RETURN_IF_ERROR(RunSelect(select, num_cols, stream));

  // 4. Breakdown of the returned rows.
  const int64_t entries = int64_t(num_cols) * lists * k;
  if (options.want_breakdown) {
    for (size_t o = 0; o < order.size(); ++o) {
      const StoreChunk& c = chunks[size_t(order[o])];
      if (tensor) {
        TensorBreakdownArgs args;
        args.vectors = c.vectors;
        args.norms = c.norms;
        args.rows = c.rows;
        args.pos0 = pos0[o];
        args.cs_count = cs_count;
        args.dim = layout.dim;
        args.dpad = int32_t(dpad);
        args.ncp = ncols;
        args.k = k;
        args.lists = lists;
        args.entries = entries;
        args.selected = selected;
        args.qhi = qhi;
        args.qlo = qlo;
        args.inv_scale = inv_scale;
        args.scale = scale;
        args.slot_active = slot_active;
        args.breakdown = breakdown;
        RETRACE_KERNEL_RETURN_IF_ERROR(
            LaunchTensorBreakdown(layout.dtype, args, stream));
      } else {
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
// than that. The tensor-core path adds the error of the split queries, at
// most 2^-16 of the sum of absolute terms (bf16; 2^-22 for fp16).
constexpr float kSelfTestRelErr = 2e-6f;
constexpr float kSelfTestTensorRelErr = kSelfTestRelErr + 1.0f / 65536.0f;

KernelStatus SelfTestOne(DType dtype, int dim, int num_queries, uint64_t seed,
                         CudaScanPath path) {
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
  options.cuda_path = path;

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
  const float rel_err = path == CudaScanPath::kTensorCore
                            ? kSelfTestTensorRelErr
                            : kSelfTestRelErr;
  const float tol = rel_err * 6.25f * float(dim) * float(cs);
  const std::string where = std::string("scan self-test (") +
                            CudaScanPathName(path) + ", " + DTypeName(dtype) +
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
  CudaScanPath path = CudaScanPath::kFp32;
  RETRACE_KERNEL_RETURN_IF_ERROR(
      ChooseCudaScanPath(layout, options.cuda_path, &path));
  *scratch_bytes =
      PlanScanScratch(layout, TotalRows(chunks), num_queries, options, path)
          .total;
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
    CudaScanPath path = CudaScanPath::kFp32;
    RETRACE_KERNEL_RETURN_IF_ERROR(
        ChooseCudaScanPath(layout, options.cuda_path, &path));
    return ScanCudaImpl(layout, chunks, queries, options, path, scratch,
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
    // Both paths; vector loads (D multiple of 8), scalar loads (odd D), every
    // dtype; the fp32 path's 1-, 4- and 32-column-group configurations and
    // the tensor-core path's 1-, 2- and 8-fragment ones.
    constexpr CudaScanPath kFp32 = CudaScanPath::kFp32;
    constexpr CudaScanPath kTensor = CudaScanPath::kTensorCore;
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kF16, 64, 1, 1, kFp32));
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kBF16, 37, 7, 2, kFp32));
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kF32, 40, 64, 3, kFp32));
    RETRACE_KERNEL_RETURN_IF_ERROR(SelfTestOne(DType::kF16, 64, 1, 4, kTensor));
    RETRACE_KERNEL_RETURN_IF_ERROR(
        SelfTestOne(DType::kBF16, 37, 9, 5, kTensor));
    RETRACE_KERNEL_RETURN_IF_ERROR(
        SelfTestOne(DType::kF16, 24, 64, 6, kTensor));
  } catch (const std::bad_alloc&) {
    return KernelStatus::OutOfMemory("scan self-test: host allocation failed");
  }
  return KernelStatus::Ok();
}

}  // namespace retrace::kernels

// CPU backend (and reference) of the fused scoring scan; see scoring.h.
//
// Work is split into tiles of consecutive rows handed to worker threads
// through an atomic counter. For each tile and each (checkpoint, slot) pair
// with a non-zero weight, the tile's row pieces are dotted with all 2Q query
// vectors of that slot by a register-blocked micro-kernel (RB rows x QB
// queries x 2 methods), so memory traffic is one read of each row.
//
// Two kinds of instruction set:
//  - buffered (scalar, AVX2): the R row pieces of a slot are first converted
//    to fp32 into a small per-thread buffer that stays in L1/L2 while the
//    micro-kernel sweeps it;
//  - direct (AVX-512): the micro-kernel reads the stored values (fp16, bf16
//    or fp32) and converts them in registers, and the loop order follows the
//    batch: with one query block, a block of RB rows is read through all its
//    slots front to back (a few sequential streams, so the prefetchers keep
//    up and the scan runs at memory speed); with more, the slot is the outer
//    loop so that its 2Q query vectors stay in cache while the rows sweep.
//    The loop order changes which dots run first, never how one is computed.
//
// A third kind, the matrix unit (AMX, fp16 and bf16 stores): kernels/scan_amx
// computes the dots of up to 64 rows with all the slot's queries per call.
// With at most 16 queries the tile's rows are taken 32 at a time through all
// their slots, like the direct path's single block; with more, the slot is
// the outer loop over a tile of kAmxTileRows rows, so that each slot's packed
// queries are reused by many rows before the next slot's replace them.
//
// Every other dot product is one W-lane accumulator chain over d (W = 8 for the
// scalar and AVX2 paths, 16 for AVX-512; the query vectors are zero-padded to
// a multiple of 16 and the row's tail is zero-filled) followed by a fixed
// horizontal-sum tree; slot contributions are summed in double in cs order.
// Neither depends on the blocking, the loop order, the tile boundaries, the
// thread count or the other queries, so a (row, query) score is reproducible
// bit for bit within one instruction set.
//
// Each thread keeps, per ranked list, a threshold buffer of packed candidates
// (kernels/topk.h); at the end the buffers of all threads are merged exactly.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/device.h"
#include "kernels/scan_amx.h"
#include "kernels/scoring.h"
#include "kernels/topk.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RETRACE_SCAN_X86 1
#endif

namespace retrace::kernels {
namespace {

constexpr int64_t kLanes = 8;
// Query vectors are zero-padded to a multiple of the widest chain (AVX-512).
constexpr int64_t kQueryPad = 16;
// Budget for the per-thread fp32 tile buffer: small enough for L2 next to one
// slot's query vectors.
constexpr int64_t kTileBufferBytes = 64 * 1024;
constexpr int64_t kMaxTileRows = 32;
// Rows per tile of the matrix-unit path (a multiple of amx::kCallRows).
constexpr int64_t kAmxTileRows = 256;
// Rows taken through all their slots at a time when the queries fit one
// column group: measured on a bf16 store (200k rows, scan_bench, two runs
// each), 32 rows read Q = 1 at 222-236 ms and Q = 8 at 252-258 ms, 16 rows
// 200-234 / 267-297 ms, 64 rows 256-280 / 350-452 ms (64 concurrent row
// streams are more than the memory system keeps up with).
constexpr int64_t kAmxRowFirstRows = 32;
// Largest micro-kernel blocks (the blockings each instruction set uses are
// kRowBlock16Regs and kRowBlock32Regs below).
constexpr int kMaxQueryBlock = 3;
constexpr int kMaxRowBlock = 8;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string SlotName(const StoreLayout& layout, int64_t cs) {
  return "checkpoint " + std::to_string(cs / layout.slots) + " slot " +
         std::to_string(cs % layout.slots);
}

// ---------------------------------------------------------------------------
// Dot products and conversion. Both ISAs implement the same contract; within
// one ISA the arithmetic of a dot does not depend on RB or QB.

// Micro-kernel: for rb rows (row r at u + r * u_stride elements: fp32 values
// padded to dp for a buffered instruction set, the stored values with d valid
// ones for a direct one) and qb queries (query i, method m at
// q + (2 * i + m) * dp), out[r * out_row_stride + 2 * i + m] = <u_r, q_im>.
using MicroFn = void (*)(const void* u, int64_t u_stride, int64_t d,
                         const float* q, int64_t dp, float* out,
                         int64_t out_row_stride);
// Converts d stored values to fp32 and zero-pads them to dp.
using ConvertFn = void (*)(const void* src, DType dtype, int64_t d, int64_t dp,
                           float* dst);

float ToFloat(const void* src, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(src)[i]);
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(src)[i]);
    case DType::kF32:
      return static_cast<const float*>(src)[i];
  }
  return 0.0f;
}

void ConvertScalar(const void* src, DType dtype, int64_t d, int64_t dp,
                   float* dst) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, size_t(d) * sizeof(float));
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = ToFloat(src, dtype, i);
  }
  for (int64_t i = d; i < dp; ++i) dst[i] = 0.0f;
}

// The horizontal sum of 8 lanes, in the same tree as HsumAvx2.
float HsumLanes(const float* l) {
  float s0 = l[0] + l[4], s1 = l[1] + l[5], s2 = l[2] + l[6], s3 = l[3] + l[7];
  float t0 = s0 + s2, t1 = s1 + s3;
  return t0 + t1;
}

template <int RB, int QB>
void MicroScalar(const void* u_void, int64_t u_stride, int64_t /*d*/,
                 const float* q, int64_t dp, float* out,
                 int64_t out_row_stride) {
  const float* u = static_cast<const float*>(u_void);
  for (int r = 0; r < RB; ++r) {
    for (int i = 0; i < 2 * QB; ++i) {
      float lanes[kLanes] = {};
      const float* ur = u + r * u_stride;
      const float* qi = q + i * dp;
      for (int64_t d = 0; d < dp; d += kLanes) {
        for (int l = 0; l < kLanes; ++l) lanes[l] += ur[d + l] * qi[d + l];
      }
      out[r * out_row_stride + i] = HsumLanes(lanes);
    }
  }
}

#ifdef RETRACE_SCAN_X86
__attribute__((target("avx2,fma"))) inline float HsumAvx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) void ConvertAvx2(const void* src,
                                                          DType dtype,
                                                          int64_t d, int64_t dp,
                                                          float* dst) {
  int64_t i = 0;
  if (dtype == DType::kF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; i + kLanes <= d; i += kLanes) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
  } else if (dtype == DType::kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; i + kLanes <= d; i += kLanes) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
    }
  } else {
    const float* s = static_cast<const float*>(src);
    for (; i + kLanes <= d; i += kLanes) {
      _mm256_storeu_ps(dst + i, _mm256_loadu_ps(s + i));
    }
  }
  for (; i < d; ++i) dst[i] = ToFloat(src, dtype, i);
  for (; i < dp; ++i) dst[i] = 0.0f;
}

// How far ahead of its loads the direct micro-kernels ask for each row's
// next cache line. A row's values continue in its next slot, so the stream
// runs on across calls; 4 KiB pages end the hardware prefetchers' streams,
// not this one. Measured on the 2-core Xeon (fp16 store, Q = 1, alternating
// binaries): 1024 bytes 149-172 ms, 512 169-174, 2048 153-179, none 174-206.
constexpr int64_t kRowPrefetchBytes = 1024;

// 8 stored values at p (the first `count` of them when count < 8, the rest
// zero) as fp32: the values ConvertAvx2 writes to its buffer.
template <DType DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadRow8(const void* p,
                                                                int64_t count) {
  if (count >= kLanes) {
    if constexpr (DT == DType::kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(p));
    } else {
      const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
      if constexpr (DT == DType::kF16) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  alignas(32) float v[kLanes] = {};
  for (int64_t i = 0; i < count; ++i) v[i] = ToFloat(p, DT, i);
  return _mm256_load_ps(v);
}

// The AVX2 micro-kernel: rows of DT at u + r * u_stride elements, d valid
// values each (zero past d up to dp), one 8-lane fmadd chain per (row, query
// vector) over dp. Read from the store directly or from ConvertAvx2's fp32
// buffer (MicroAvx2), the values and chains are the same, so the bits are.
// With kPrefetch each row is prefetched kRowPrefetchBytes ahead, like the
// AVX-512 kernel.
template <DType DT, int RB, int QB, bool kPrefetch = true>
__attribute__((target("avx2,fma,f16c"))) void MicroAvx2Direct(
    const void* u, int64_t u_stride, int64_t d, const float* q, int64_t dp,
    float* out, int64_t out_row_stride) {
  const int64_t elem = DTypeSize(DT);
  const uint8_t* rows = static_cast<const uint8_t*>(u);
  __m256 acc[RB][2 * QB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) acc[r][i] = _mm256_setzero_ps();
  }
  for (int64_t x = 0; x < dp; x += kLanes) {
    __m256 uv[RB];
    if (kPrefetch && (x * elem) % 64 == 0) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        __builtin_prefetch(rows + (r * u_stride + x) * elem +
                           kRowPrefetchBytes);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      uv[r] = LoadRow8<DT>(rows + (r * u_stride + x) * elem, d - x);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * dp + x);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        acc[r][i] = _mm256_fmadd_ps(uv[r], qv, acc[r][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) {
      out[r * out_row_stride + i] = HsumAvx2(acc[r][i]);
    }
  }
}

#define RETRACE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// The horizontal sum of 16 lanes: the upper 256 bits onto the lower, then the
// 8-lane tree of HsumAvx2.
RETRACE_AVX512 inline float HsumAvx512(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi =
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return HsumAvx2(_mm256_add_ps(lo, hi));
}

// 16 stored values at p (the first `count` of them when count < 16, the rest
// zero) as fp32.
template <DType DT>
RETRACE_AVX512 inline __m512 LoadRow16(const void* p, int64_t count) {
  if constexpr (DT == DType::kF32) {
    const float* f = static_cast<const float*>(p);
    return count >= 16 ? _mm512_loadu_ps(f)
                       : _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), f);
  } else {
    const __m256i h =
        count >= 16 ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                    : _mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1), p);
    if constexpr (DT == DType::kF16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// The direct micro-kernel: rows of DT at u + r * u_stride elements, d valid
// values each; one 16-lane fmadd chain per (row, query vector) over d, each
// row prefetched kRowPrefetchBytes ahead.
template <DType DT, int RB, int QB>
RETRACE_AVX512 void MicroAvx512(const void* u, int64_t u_stride, int64_t d,
                                const float* q, int64_t dp, float* out,
                                int64_t out_row_stride) {
  const int64_t elem = DTypeSize(DT);
  const uint8_t* rows = static_cast<const uint8_t*>(u);
  __m512 acc[RB][2 * QB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) acc[r][i] = _mm512_setzero_ps();
  }
  for (int64_t x = 0; x < d; x += 16) {
    const int64_t count = std::min<int64_t>(16, d - x);
    __m512 uv[RB];
    if ((x * elem) % 64 == 0) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        __builtin_prefetch(rows + (r * u_stride + x) * elem +
                           kRowPrefetchBytes);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      uv[r] = LoadRow16<DT>(rows + (r * u_stride + x) * elem, count);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + i * dp + x);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        acc[r][i] = _mm512_fmadd_ps(uv[r], qv, acc[r][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < 2 * QB; ++i) {
      out[r * out_row_stride + i] = HsumAvx512(acc[r][i]);
    }
  }
}
#endif  // RETRACE_SCAN_X86

struct Isa {
  MicroFn micro[kMaxRowBlock][kMaxQueryBlock];  // [rb - 1][qb - 1]
  int row_block[kMaxQueryBlock];                // rows per call, by qb - 1
  // Buffered: rows are converted to fp32 with `convert` before the
  // micro-kernel; direct (convert == nullptr): it reads the stored values.
  ConvertFn convert;
  // The matrix unit computes the dots (kernels/scan_amx.h); `micro` and
  // `convert` are then unused.
  bool amx = false;
  // The per-row bookkeeping (scores, list offers) runs eight lanes at a time
  // with AVX-512 (same results as the scalar loops).
  bool wide = false;
  bool direct() const { return convert == nullptr; }
};

template <int RB, int QB>
struct ScalarKernel {
  static constexpr MicroFn kFn = &MicroScalar<RB, QB>;
};
#ifdef RETRACE_SCAN_X86
// The buffered AVX2 micro-kernel: MicroAvx2Direct over the fp32 rows that
// ConvertAvx2 wrote, zero-padded to dp (so every step is a whole load),
// without the row prefetch (the buffer is in cache; asking cost 9% at Q = 8).
template <int RB, int QB>
__attribute__((target("avx2,fma,f16c"))) void MicroAvx2(
    const void* u, int64_t u_stride, int64_t /*d*/, const float* q, int64_t dp,
    float* out, int64_t out_row_stride) {
  MicroAvx2Direct<DType::kF32, RB, QB, false>(u, u_stride, dp, q, dp, out,
                                              out_row_stride);
}
template <int RB, int QB>
struct Avx2Kernel {
  static constexpr MicroFn kFn = &MicroAvx2<RB, QB>;
};
template <DType DT>
struct Avx2Direct {
  template <int RB, int QB>
  struct Kernel {
    static constexpr MicroFn kFn = &MicroAvx2Direct<DT, RB, QB>;
  };
};
template <DType DT>
struct Avx512 {
  template <int RB, int QB>
  struct Kernel {
    static constexpr MicroFn kFn = &MicroAvx512<DT, RB, QB>;
  };
};
#endif

// Fills isa->micro[rb - 1][qb - 1] with K<rb, qb> for every rb >= RB (and
// qb >= QB in row RB).
template <template <int, int> class K, int RB = 1, int QB = 1>
void FillMicro(Isa* isa) {
  isa->micro[RB - 1][QB - 1] = K<RB, QB>::kFn;
  if constexpr (QB < kMaxQueryBlock) {
    FillMicro<K, RB, QB + 1>(isa);
  } else if constexpr (RB < kMaxRowBlock) {
    FillMicro<K, RB + 1, 1>(isa);
  }
}

template <template <int, int> class K>
Isa MakeIsa(ConvertFn convert, std::array<int, kMaxQueryBlock> row_block) {
  Isa isa;
  FillMicro<K>(&isa);
  for (int qb = 0; qb < kMaxQueryBlock; ++qb) {
    isa.row_block[qb] = row_block[size_t(qb)];
  }
  isa.convert = convert;
  return isa;
}

// Rows per micro-kernel call by query block: the accumulators, row vectors
// and one query vector fit the 16 AVX2 (32 AVX-512) registers. With one
// query, AVX-512 takes 8 rows: more loads in flight per step, which is what
// a memory-bound scan needs (measured: 4 rows read 0.6 of the bandwidth,
// 8 rows 0.7). Other blockings measured no better: 6 rows x 2 queries the
// same, 3 rows x 3 or 4 queries half as fast.
constexpr std::array<int, kMaxQueryBlock> kRowBlock16Regs = {4, 2, 2};
constexpr std::array<int, kMaxQueryBlock> kRowBlock32Regs = {8, 4, 4};

#ifdef RETRACE_SCAN_X86
// The direct kernels K<DT>::Kernel (which read the stored values) for the
// store's type.
template <template <DType> class K>
Isa MakeDirectIsa(DType dtype, std::array<int, kMaxQueryBlock> row_block) {
  switch (dtype) {
    case DType::kF16:
      return MakeIsa<K<DType::kF16>::template Kernel>(nullptr, row_block);
    case DType::kBF16:
      return MakeIsa<K<DType::kBF16>::template Kernel>(nullptr, row_block);
    case DType::kF32:
      break;
  }
  return MakeIsa<K<DType::kF32>::template Kernel>(nullptr, row_block);
}
#endif

// `num_queries` picks between AVX2's two forms: up to kMaxQueryBlock
// queries read the stored rows directly (one pass of row blocks through all
// slots, memory-bound), more convert each row to an fp32 buffer once for all
// query blocks. Both run the same arithmetic.
KernelStatus SelectIsa(CpuIsa requested, DType dtype, int32_t num_queries,
                       Isa* isa) {
  CpuIsa chosen = CpuIsa::kScalar;
  RETRACE_KERNEL_RETURN_IF_ERROR(ChooseCpuScanIsa(requested, dtype, &chosen));
  switch (chosen) {
#ifdef RETRACE_SCAN_X86
    case CpuIsa::kAmx:
      *isa = Isa{};
      isa->convert = nullptr;
      isa->amx = true;
      isa->wide = true;
      return KernelStatus::Ok();
    case CpuIsa::kAvx512:
      *isa = MakeDirectIsa<Avx512>(dtype, kRowBlock32Regs);
      isa->wide = true;
      return KernelStatus::Ok();
    case CpuIsa::kAvx2:
      *isa = num_queries > kMaxQueryBlock
                 ? MakeIsa<Avx2Kernel>(&ConvertAvx2, kRowBlock16Regs)
                 : MakeDirectIsa<Avx2Direct>(dtype, kRowBlock16Regs);
      return KernelStatus::Ok();
#endif
    default:
      *isa = MakeIsa<ScalarKernel>(&ConvertScalar, kRowBlock16Regs);
      return KernelStatus::Ok();
  }
}

// ---------------------------------------------------------------------------
// Queries, re-laid out once per call: for slot cs, query q, method m the
// zero-padded vector at vectors[((cs * Q + q) * 2 + m) * dp]; weights at
// weights[(cs * Q + q) * 2 + m].
struct PreparedQueries {
  int64_t slot_pairs = 0;
  int32_t num_queries = 0;
  int64_t dim = 0;
  int64_t dp = 0;
  std::vector<float> vectors;
  std::vector<float> weights;
  std::vector<int64_t> active_slots;  // cs with a non-zero weight somewhere
  amx::PackedQueries amx;             // the matrix-unit path's copy

  const float* Slot(int64_t cs) const {
    return vectors.data() + cs * num_queries * 2 * dp;
  }
  float Weight(int64_t cs, int q, int m) const {
    return weights[size_t((cs * num_queries + q) * 2 + m)];
  }
};

const char* NonFiniteName(float v) {
  return std::isnan(v) ? "NaN" : "infinite";
}

KernelStatus PrepareQueries(const StoreLayout& layout, const QueryBatch& qb,
                            PreparedQueries* p) {
  const int64_t cs_count = layout.SlotPairs();
  const int64_t d = layout.dim;
  const int32_t nq = qb.num_queries;
  p->slot_pairs = cs_count;
  p->num_queries = nq;
  p->dim = d;
  p->dp = RoundUp(d, kQueryPad);
  p->vectors.assign(size_t(cs_count * nq * 2 * p->dp), 0.0f);
  p->weights.assign(size_t(cs_count * nq * 2), 0.0f);
  p->active_slots.clear();
  const float* sources[kNumMethods] = {qb.raw, qb.unit};
  const float* weights[kNumMethods] = {qb.tracin_weights, qb.retrac_weights};
  const char* vector_names[kNumMethods] = {"raw", "unit"};
  const char* weight_names[kNumMethods] = {"tracin", "retrac"};
  for (int32_t q = 0; q < nq; ++q) {
    for (int64_t cs = 0; cs < cs_count; ++cs) {
      for (int m = 0; m < kNumMethods; ++m) {
        float w = weights[m][q * cs_count + cs];
        if (!std::isfinite(w)) {
          return KernelStatus::InvalidArgument(
              "query " + std::to_string(q) + ", " + SlotName(layout, cs) +
              ": " + weight_names[m] + " weight is " + NonFiniteName(w));
        }
        p->weights[size_t((cs * nq + q) * 2 + m)] = w;
        const float* src = sources[m] + (q * cs_count + cs) * d;
        float* dst = p->vectors.data() + ((cs * nq + q) * 2 + m) * p->dp;
        for (int64_t i = 0; i < d; ++i) {
          if (!std::isfinite(src[i])) {
            return KernelStatus::InvalidArgument(
                "query " + std::to_string(q) + ", " + SlotName(layout, cs) +
                ": " + vector_names[m] + " vector value " + std::to_string(i) +
                " is " + NonFiniteName(src[i]));
          }
          dst[i] = src[i];
        }
      }
    }
  }
  for (int64_t cs = 0; cs < cs_count; ++cs) {
    bool active = false;
    for (int32_t q = 0; q < nq; ++q) {
      active =
          active || p->Weight(cs, q, 0) != 0.0f || p->Weight(cs, q, 1) != 0.0f;
    }
    if (active) p->active_slots.push_back(cs);
  }
  return KernelStatus::Ok();
}

// ---------------------------------------------------------------------------
// Selection.

// Keeps a superset of the k best candidates pushed so far: anything not
// better than the current k-th best is rejected with one comparison.
class ThresholdBuffer {
 public:
  void Reset(int32_t k) {
    k_ = size_t(k);
    capacity_ = 2 * k_ + 64;
    threshold_ = 0;
    buffer_.clear();
  }
  void Push(uint64_t candidate) {
    if (candidate <= threshold_) return;
    buffer_.push_back(candidate);
    if (buffer_.size() >= capacity_) Compact();
  }
  const std::vector<uint64_t>& candidates() const { return buffer_; }
  // Every candidate at or below this is rejected (0 until the first
  // compaction).
  uint64_t threshold() const { return threshold_; }

 private:
  void Compact() {
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(),
                     std::greater<uint64_t>());
    buffer_.resize(k_);
    threshold_ =
        buffer_[k_ - 1];  // the smallest kept: nth_element put it there
  }

  size_t k_ = 1;
  size_t capacity_ = 0;
  uint64_t threshold_ = 0;
  std::vector<uint64_t> buffer_;
};

// The k best of `all`, best first.
void TakeBest(std::vector<uint64_t>* all, size_t k) {
  if (all->size() > k) {
    std::nth_element(all->begin(), all->begin() + (k - 1), all->end(),
                     std::greater<uint64_t>());
    all->resize(k);
  }
  std::sort(all->begin(), all->end(), std::greater<uint64_t>());
}

// List numbering: list = (q * 2 + method) * 2 + (bottom ? 1 : 0).
int ListCount(int32_t nq) { return nq * kNumMethods * 2; }

// Runs fn(thread_id) on `threads` threads (the caller's included) and reports
// whether any of them ran out of memory.
bool RunThreads(int threads, const std::function<void(int)>& fn) {
  std::atomic<bool> failed{false};
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
  };
  std::vector<std::thread> workers;
  try {
    workers.reserve(size_t(threads - 1));
    for (int t = 1; t < threads; ++t) workers.emplace_back(guarded, t);
  } catch (const std::exception&) {
    failed = true;  // fewer threads: the counters below still cover all work
  }
  guarded(0);
  for (std::thread& w : workers) w.join();
  return !failed;
}

struct Tile {
  int32_t chunk;
  int64_t row0;
  int64_t rows;
};

// Per-thread scan state.
struct Worker {
  std::vector<float> rows;     // [R, dp] converted row pieces of one slot
  std::vector<float> dots;     // [R, Q, 2] dots of one slot
  std::vector<double> scores;  // [R, Q, 2]
  std::vector<ThresholdBuffer> lists;
  // For the wide path: the key half of each list's threshold, top lists
  // [Q * 2] and bottom lists [Q * 2] by column (a key below it is rejected).
  std::vector<uint32_t> top_floor;
  std::vector<uint32_t> bottom_floor;
  bool wide = false;
  amx::Scratch amx;
};

const uint8_t* RowSlot(const StoreLayout& layout, const StoreChunk& chunk,
                       int64_t row, int64_t cs) {
  return static_cast<const uint8_t*>(chunk.vectors) +
         ((row * layout.SlotPairs() + cs) * layout.dim) *
             DTypeSize(layout.dtype);
}

#ifdef RETRACE_SCAN_X86
// AccumulateSlot's arithmetic for one row, eight columns at a time: the same
// IEEE operations in the same order as its scalar loop (a TracIn column's
// weight times the norm, a ReTrac column's times 1, which is exact; then
// times the dot, then added), so the scores have the same bits.
RETRACE_AVX512 void AccumulateRowAvx512(const float* weights, double norm,
                                        const float* dot, int64_t cols,
                                        double* score) {
  const __m512d scale =
      _mm512_mask_blend_pd(0x55, _mm512_set1_pd(1.0), _mm512_set1_pd(norm));
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m512d wn =
        _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(weights + j)), scale);
    const __m512d t =
        _mm512_mul_pd(wn, _mm512_cvtps_pd(_mm256_loadu_ps(dot + j)));
    _mm512_storeu_pd(score + j, _mm512_add_pd(_mm512_loadu_pd(score + j), t));
  }
  for (; j < cols; ++j) {
    score[j] += double(weights[j]) * ((j & 1) ? 1.0 : norm) * double(dot[j]);
  }
}

// Pushes key/index to `list` and refreshes its floor.
inline void PushWithFloor(ThresholdBuffer* list, uint32_t key, int64_t index,
                          uint32_t* floor) {
  list->Push(PackCandidate(key, index));
  *floor = uint32_t(list->threshold() >> 32);
}

// Pushes the keys of columns c..c+7 (list of column j: lists[j * 2 +
// bottom]) that are at or above their list's floor; Push would reject the
// others anyway.
RETRACE_AVX512 void PushKeysAtFloor(__m256i keys, int64_t c, int bottom,
                                    int64_t index, uint32_t* floor,
                                    ThresholdBuffer* lists) {
  alignas(32) uint32_t key[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(key), keys);
  unsigned pass = _mm256_cmpge_epu32_mask(
      keys, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(floor + c)));
  for (; pass != 0; pass &= pass - 1) {
    const int j = __builtin_ctz(pass);
    PushWithFloor(&lists[size_t((c + j) * 2 + bottom)], key[j], index,
                  &floor[c + j]);
  }
}

// OfferRow eight columns at a time: RankKey of each score in lanes (NaN to
// 0, -0 as +0, the sign-flip ordering), and only the keys at or above their
// list's floor go to Push, which rejects the rest anyway: the lists end up
// exactly as with the scalar loop.
RETRACE_AVX512 void OfferRowAvx512(const double* score, int64_t cols,
                                   int64_t index, bool want_bottom, Worker* w) {
  const __m256i sign = _mm256_set1_epi32(int32_t(0x80000000u));
  const __m256i ones = _mm256_set1_epi32(-1);
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    const __m256 f = _mm512_cvtpd_ps(_mm512_loadu_pd(score + c));
    const __mmask8 nan = _mm256_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    const __mmask8 zero =
        _mm256_cmp_ps_mask(f, _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256i bits =
        _mm256_maskz_mov_epi32(__mmask8(~zero), _mm256_castps_si256(f));
    const __mmask8 negative = _mm256_movepi32_mask(bits);
    const __m256i ordered = _mm256_mask_xor_epi32(_mm256_or_si256(bits, sign),
                                                  negative, bits, ones);
    PushKeysAtFloor(_mm256_maskz_mov_epi32(__mmask8(~nan), ordered), c, 0,
                    index, w->top_floor.data(), w->lists.data());
    if (want_bottom) {
      PushKeysAtFloor(_mm256_maskz_mov_epi32(__mmask8(~nan),
                                             _mm256_xor_si256(ordered, ones)),
                      c, 1, index, w->bottom_floor.data(), w->lists.data());
    }
  }
  for (; c < cols; ++c) {
    const float s = float(score[c]);
    PushWithFloor(&w->lists[size_t(c * 2)], RankKey(s, true), index,
                  &w->top_floor[size_t(c)]);
    if (want_bottom) {
      PushWithFloor(&w->lists[size_t(c * 2 + 1)], RankKey(s, false), index,
                    &w->bottom_floor[size_t(c)]);
    }
  }
}
#undef RETRACE_AVX512
#endif  // RETRACE_SCAN_X86

// Adds slot cs's contributions of the tile's rows [r0, r0 + rows), from their
// dots in w->dots, to their scores (in double; each row's slots arrive in cs
// order whatever the loop order): score += weight * norm * dot (TracIn
// columns) or weight * dot (ReTrac columns), in that order of operations.
void AccumulateSlot(const StoreChunk& chunk, const Tile& tile,
                    const PreparedQueries& pq, int64_t cs, int64_t r0,
                    int64_t rows, Worker* w) {
  const int64_t row_stride = int64_t{pq.num_queries} * 2;
  const float* weights = pq.weights.data() + cs * row_stride;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const double norm = chunk.norms[(tile.row0 + r) * pq.slot_pairs + cs];
    const float* dot = w->dots.data() + r * row_stride;
    double* score = w->scores.data() + r * row_stride;
#ifdef RETRACE_SCAN_X86
    if (w->wide && row_stride >= 8) {
      AccumulateRowAvx512(weights, norm, dot, row_stride, score);
      continue;
    }
#endif
    for (int64_t j = 0; j < row_stride; j += 2) {
      score[j] += double(weights[j]) * norm * double(dot[j]);
      score[j + 1] += double(weights[j + 1]) * double(dot[j + 1]);
    }
  }
}

// Offers sample `index`'s scores (one per column, [Q][2]) to the worker's
// top lists, and to its bottom lists when `want_bottom`.
void OfferRow(const double* score, int64_t cols, int64_t index,
              bool want_bottom, Worker* w) {
#ifdef RETRACE_SCAN_X86
  if (w->wide && cols >= 8) {
    OfferRowAvx512(score, cols, index, want_bottom, w);
    return;
  }
#endif
  for (int64_t col = 0; col < cols; ++col) {
    const float s = float(score[col]);
    w->lists[size_t(col * 2)].Push(PackCandidate(RankKey(s, true), index));
    if (want_bottom) {
      w->lists[size_t(col * 2 + 1)].Push(
          PackCandidate(RankKey(s, false), index));
    }
  }
}

// The dots of slot cs for the tile's rows [0, tile.rows) and every query.
// `rows` is the first row's data (fp32 with stride dp for a buffered
// instruction set, the store's row for a direct one), `stride` the distance
// between rows in elements.
void SlotDots(const StoreLayout& layout, const Tile& tile,
              const PreparedQueries& pq, const Isa& isa, int64_t cs,
              const void* rows, int64_t stride, int64_t elem, Worker* w) {
  const int32_t nq = pq.num_queries;
  const int64_t dp = pq.dp;
  const int64_t row_stride = int64_t{nq} * 2;
  const float* qslot = pq.Slot(cs);
  for (int32_t q0 = 0; q0 < nq; q0 += kMaxQueryBlock) {
    const int qb = std::min<int>(kMaxQueryBlock, nq - q0);
    const int rb_max = isa.row_block[qb - 1];
    for (int64_t r0 = 0; r0 < tile.rows; r0 += rb_max) {
      const int rb = int(std::min<int64_t>(rb_max, tile.rows - r0));
      isa.micro[rb - 1][qb - 1](
          static_cast<const uint8_t*>(rows) + r0 * stride * elem, stride,
          layout.dim, qslot + int64_t{q0} * 2 * dp, dp,
          w->dots.data() + r0 * row_stride + q0 * 2, row_stride);
    }
  }
}

// The matrix-unit dots of slot cs for the tile's rows [r0, r0 + rows),
// amx::kCallRows at a time. Each call is told the rows the following one
// reads: the next rows of this slot, or after the last of them the first
// rows of `next_cs` (-1: none).
void AmxSlotDots(const StoreLayout& layout, const StoreChunk& chunk,
                 const Tile& tile, const PreparedQueries& pq, int64_t cs,
                 int64_t next_cs, int64_t r0, int64_t rows, Worker* w) {
  const int64_t row_stride = int64_t{pq.num_queries} * 2;
  const int64_t elem = DTypeSize(layout.dtype);
  for (int64_t r = r0; r < r0 + rows; r += amx::kCallRows) {
    const int n = int(std::min<int64_t>(amx::kCallRows, r0 + rows - r));
    amx::NextRows next;
    next.stride = layout.RowValues() * elem;
    next.bytes = layout.dim * elem;
    if (r + n < r0 + rows) {
      next.rows = RowSlot(layout, chunk, tile.row0 + r + n, cs);
      next.count = int(std::min<int64_t>(amx::kCallRows, r0 + rows - r - n));
    } else if (next_cs >= 0) {
      next.rows = RowSlot(layout, chunk, tile.row0 + r0, next_cs);
      next.count = int(std::min<int64_t>(amx::kCallRows, rows));
    }
    amx::SlotDots(layout.dtype, RowSlot(layout, chunk, tile.row0 + r, cs),
                  layout.RowValues(), n, pq.amx, cs, &w->amx,
                  w->dots.data() + r * row_stride, row_stride, next);
  }
}

void ScanTile(const StoreLayout& layout, const StoreChunk& chunk,
              const Tile& tile, const PreparedQueries& pq, const Isa& isa,
              bool want_bottom, Worker* w) {
  const int32_t nq = pq.num_queries;
  const int64_t dp = pq.dp;
  const int64_t row_stride = int64_t{nq} * 2;
  std::fill(w->scores.begin(), w->scores.begin() + tile.rows * row_stride, 0.0);
  if (isa.amx) {
    amx::TileSession session;
    if (pq.amx.col_tiles() <= 4) {
      for (int64_t r0 = 0; r0 < tile.rows; r0 += kAmxRowFirstRows) {
        const int64_t rb = std::min<int64_t>(kAmxRowFirstRows, tile.rows - r0);
        for (int64_t cs : pq.active_slots) {
          AmxSlotDots(layout, chunk, tile, pq, cs, -1, r0, rb, w);
          AccumulateSlot(chunk, tile, pq, cs, r0, rb, w);
        }
      }
    } else {
      const std::vector<int64_t>& slots = pq.active_slots;
      for (size_t i = 0; i < slots.size(); ++i) {
        const int64_t next_cs = i + 1 < slots.size() ? slots[i + 1] : -1;
        AmxSlotDots(layout, chunk, tile, pq, slots[i], next_cs, 0, tile.rows,
                    w);
        AccumulateSlot(chunk, tile, pq, slots[i], 0, tile.rows, w);
      }
    }
  } else if (!isa.direct()) {
    for (int64_t cs : pq.active_slots) {
      for (int64_t r = 0; r < tile.rows; ++r) {
        isa.convert(RowSlot(layout, chunk, tile.row0 + r, cs), layout.dtype,
                    layout.dim, dp, w->rows.data() + r * dp);
      }
      SlotDots(layout, tile, pq, isa, cs, w->rows.data(), dp, 4, w);
      AccumulateSlot(chunk, tile, pq, cs, 0, tile.rows, w);
    }
  } else if (nq <= kMaxQueryBlock) {
    // One query block: each block of rows is read through all its slots,
    // front to back, before the next.
    const int rb_max = isa.row_block[nq - 1];
    for (int64_t r0 = 0; r0 < tile.rows; r0 += rb_max) {
      const int rb = int(std::min<int64_t>(rb_max, tile.rows - r0));
      for (int64_t cs : pq.active_slots) {
        isa.micro[rb - 1][nq - 1](RowSlot(layout, chunk, tile.row0 + r0, cs),
                                  layout.RowValues(), layout.dim, pq.Slot(cs),
                                  dp, w->dots.data() + r0 * row_stride,
                                  row_stride);
        AccumulateSlot(chunk, tile, pq, cs, r0, rb, w);
      }
    }
  } else {
    for (int64_t cs : pq.active_slots) {
      SlotDots(layout, tile, pq, isa, cs, RowSlot(layout, chunk, tile.row0, cs),
               layout.RowValues(), DTypeSize(layout.dtype), w);
      AccumulateSlot(chunk, tile, pq, cs, 0, tile.rows, w);
    }
  }
  for (int64_t r = 0; r < tile.rows; ++r) {
    OfferRow(w->scores.data() + r * row_stride, row_stride,
             chunk.first_index + tile.row0 + r, want_bottom, w);
  }
}

// Chunk holding global `index`, or -1 (chunks_by_index sorted by first_index).
int FindChunk(const std::vector<StoreChunk>& chunks,
              const std::vector<int32_t>& chunks_by_index, int64_t index) {
  auto it = std::upper_bound(
      chunks_by_index.begin(), chunks_by_index.end(), index,
      [&](int64_t i, int32_t c) { return i < chunks[size_t(c)].first_index; });
  if (it == chunks_by_index.begin()) return -1;
  const StoreChunk& c = chunks[size_t(*(it - 1))];
  return index < c.first_index + c.rows ? *(it - 1) : -1;
}

std::vector<int32_t> ChunksByIndex(const std::vector<StoreChunk>& chunks) {
  std::vector<int32_t> order(chunks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return chunks[size_t(a)].first_index < chunks[size_t(b)].first_index;
  });
  return order;
}

// Fills the breakdown of every returned sample with the same dot routine as
// the scan, so the contributions are the very terms the score summed.
void FillBreakdown(const StoreLayout& layout,
                   const std::vector<StoreChunk>& chunks,
                   const PreparedQueries& pq, const Isa& isa, int threads,
                   ScanResult* result) {
  struct Entry {
    ScoredSample* sample;
    int32_t query;
    int method;
  };
  std::vector<Entry> entries;
  for (int32_t q = 0; q < pq.num_queries; ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      RankedList& list = result->per_query[size_t(q)][size_t(m)];
      for (ScoredSample& s : list.top) entries.push_back({&s, q, m});
      for (ScoredSample& s : list.bottom) entries.push_back({&s, q, m});
    }
  }
  const std::vector<int32_t> by_index = ChunksByIndex(chunks);
  const int64_t cs_count = pq.slot_pairs;
  std::atomic<size_t> next{0};
  bool ok = RunThreads(
      std::max(1, std::min<int>(threads, int(entries.size()))), [&](int) {
        std::vector<float> row(size_t(pq.dp));
        float dots[2];
        // The matrix unit computes all of a slot's dots at once.
        std::vector<float> amx_dots;
        amx::Scratch amx_scratch;
        std::optional<amx::TileSession> session;
        if (isa.amx) {
          amx_dots.resize(size_t(pq.num_queries) * 2);
          amx_scratch.Resize(pq.amx);
          session.emplace();
        }
        for (size_t e = next++; e < entries.size(); e = next++) {
          const Entry& entry = entries[e];
          const int c = FindChunk(chunks, by_index, entry.sample->index);
          const StoreChunk& chunk = chunks[size_t(c)];
          const int64_t r = entry.sample->index - chunk.first_index;
          std::vector<float>& out = entry.sample->breakdown;
          out.assign(size_t(cs_count), 0.0f);
          for (int64_t cs : pq.active_slots) {
            const void* u = RowSlot(layout, chunk, r, cs);
            if (isa.amx) {
              amx::SlotDots(layout.dtype, u, layout.RowValues(), 1, pq.amx, cs,
                            &amx_scratch, amx_dots.data(), 0);
              dots[0] = amx_dots[size_t(entry.query) * 2];
              dots[1] = amx_dots[size_t(entry.query) * 2 + 1];
            } else {
              if (!isa.direct()) {
                isa.convert(u, layout.dtype, layout.dim, pq.dp, row.data());
                u = row.data();
              }
              isa.micro[0][0](u, pq.dp, layout.dim,
                              pq.Slot(cs) + int64_t{entry.query} * 2 * pq.dp,
                              pq.dp, dots, 2);
            }
            const double f = entry.method == 0
                                 ? double(chunk.norms[r * cs_count + cs])
                                 : 1.0;
            out[size_t(cs)] =
                float(double(pq.Weight(cs, entry.query, entry.method)) * f *
                      double(dots[entry.method]));
          }
        }
      });
  if (!ok) throw std::bad_alloc();
}

KernelStatus ScanCpuImpl(const StoreLayout& layout,
                         const std::vector<StoreChunk>& chunks,
                         const QueryBatch& queries, const ScanOptions& options,
                         ScanResult* result) {
  Isa isa;
  RETRACE_KERNEL_RETURN_IF_ERROR(
      SelectIsa(options.isa, layout.dtype, queries.num_queries, &isa));
  PreparedQueries pq;
  RETRACE_KERNEL_RETURN_IF_ERROR(PrepareQueries(layout, queries, &pq));
  if (isa.amx) {
    pq.amx.Pack(pq.slot_pairs, pq.num_queries, pq.dim, pq.vectors.data(),
                pq.dp);
  }
  const int32_t nq = queries.num_queries;
  const int32_t k = options.k;
  const int64_t tile_rows =
      isa.amx        ? kAmxTileRows
      : isa.direct() ? kMaxTileRows
                     : std::clamp<int64_t>(kTileBufferBytes / (pq.dp * 4), 1,
                                           kMaxTileRows);

  std::vector<Tile> tiles;
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int64_t r = 0; r < chunks[c].rows; r += tile_rows) {
      tiles.push_back({int32_t(c), r, std::min(tile_rows, chunks[c].rows - r)});
    }
  }
  const int threads =
      std::max(1, std::min<int>(options.num_threads > 0 ? options.num_threads
                                                        : CpuThreads(),
                                int(tiles.size())));
  const int lists = ListCount(nq);
  std::vector<Worker> workers(static_cast<size_t>(threads));
  for (Worker& w : workers) {
    if (!isa.direct()) w.rows.resize(size_t(tile_rows * pq.dp));
    if (isa.amx) w.amx.Resize(pq.amx);
    w.dots.resize(size_t(tile_rows * nq * 2));
    w.scores.resize(size_t(tile_rows * nq * 2));
    w.lists.resize(size_t(lists));
    for (ThresholdBuffer& b : w.lists) b.Reset(k);
    w.wide = isa.wide;
    w.top_floor.assign(size_t(nq * 2), 0u);
    w.bottom_floor.assign(size_t(nq * 2), 0u);
  }
  std::atomic<size_t> next_tile{0};
  if (!RunThreads(threads, [&](int t) {
        Worker& w = workers[size_t(t)];
        for (size_t i = next_tile++; i < tiles.size(); i = next_tile++) {
          ScanTile(layout, chunks[size_t(tiles[i].chunk)], tiles[i], pq, isa,
                   options.want_bottom, &w);
        }
      })) {
    return KernelStatus::OutOfMemory("scan: worker buffers");
  }

  // Exact merge of the per-thread buffers, one list at a time.
  result->per_query.assign(size_t(nq), {});
  std::atomic<int> next_list{0};
  if (!RunThreads(std::min(threads, lists), [&](int) {
        std::vector<uint64_t> all;
        for (int l = next_list++; l < lists; l = next_list++) {
          const bool bottom = (l & 1) != 0;
          if (bottom && !options.want_bottom) continue;
          all.clear();
          for (const Worker& w : workers) {
            const std::vector<uint64_t>& c = w.lists[size_t(l)].candidates();
            all.insert(all.end(), c.begin(), c.end());
          }
          TakeBest(&all, size_t(k));
          const int col = l / 2;
          RankedList& list =
              result->per_query[size_t(col / 2)][size_t(col % 2)];
          std::vector<ScoredSample>& out = bottom ? list.bottom : list.top;
          out.resize(all.size());
          for (size_t i = 0; i < all.size(); ++i) {
            out[i].index = CandidateIndex(all[i]);
            out[i].score = ScoreFromRankKey(CandidateKey(all[i]), !bottom);
          }
        }
      })) {
    return KernelStatus::OutOfMemory("scan: merging candidates");
  }
  if (options.want_breakdown) {
    FillBreakdown(layout, chunks, pq, isa, threads, result);
  }
  return KernelStatus::Ok();
}

}  // namespace

KernelStatus ValidateScan(const StoreLayout& layout,
                          const std::vector<StoreChunk>& chunks,
                          const QueryBatch& queries,
                          const ScanOptions& options) {
  if (layout.checkpoints <= 0 || layout.slots <= 0 || layout.dim <= 0) {
    return KernelStatus::InvalidArgument(
        "store layout must have checkpoints, slots and dim >= 1 (got C=" +
        std::to_string(layout.checkpoints) +
        ", S=" + std::to_string(layout.slots) +
        ", D=" + std::to_string(layout.dim) + ")");
  }
  const int dt = static_cast<int>(layout.dtype);
  if (dt < 0 || dt > static_cast<int>(DType::kF32)) {
    return KernelStatus::InvalidArgument("unknown store dtype " +
                                         std::to_string(dt));
  }
  if (chunks.empty()) {
    return KernelStatus::InvalidArgument("no store chunks to scan");
  }
  int64_t total_rows = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const StoreChunk& c = chunks[i];
    const std::string name = "chunk " + std::to_string(i);
    if (c.rows <= 0) {
      return KernelStatus::InvalidArgument(name + ": rows must be >= 1 (got " +
                                           std::to_string(c.rows) + ")");
    }
    if (c.vectors == nullptr) {
      return KernelStatus::InvalidArgument(name + ": vectors pointer is null");
    }
    if (c.norms == nullptr) {
      return KernelStatus::InvalidArgument(name + ": norms pointer is null");
    }
    if (c.first_index < 0 || c.first_index > kMaxSamples - c.rows) {
      return KernelStatus::InvalidArgument(
          name + ": sample indices " + std::to_string(c.first_index) + "+" +
          std::to_string(c.rows) + " are outside 0.." +
          std::to_string(kMaxSamples - 1));
    }
    total_rows += c.rows;
  }
  const std::vector<int32_t> order = ChunksByIndex(chunks);
  for (size_t i = 1; i < order.size(); ++i) {
    const StoreChunk& a = chunks[size_t(order[i - 1])];
    const StoreChunk& b = chunks[size_t(order[i])];
    if (a.first_index + a.rows > b.first_index) {
      return KernelStatus::InvalidArgument(
          "chunks " + std::to_string(order[i - 1]) + " and " +
          std::to_string(order[i]) + " overlap in sample indices");
    }
  }
  if (queries.num_queries < 1 || queries.num_queries > kMaxQueries) {
    return KernelStatus::InvalidArgument(
        "number of queries " + std::to_string(queries.num_queries) +
        " is out of range 1.." + std::to_string(kMaxQueries));
  }
  if (queries.raw == nullptr || queries.unit == nullptr) {
    return KernelStatus::InvalidArgument(
        "query raw/unit vector pointer is null");
  }
  if (queries.tracin_weights == nullptr || queries.retrac_weights == nullptr) {
    return KernelStatus::InvalidArgument("query weight pointer is null");
  }
  if (options.k < 1 || options.k > kMaxTopK) {
    return KernelStatus::InvalidArgument("k = " + std::to_string(options.k) +
                                         " is out of range 1.." +
                                         std::to_string(kMaxTopK));
  }
  if (options.k > total_rows) {
    return KernelStatus::InvalidArgument("k = " + std::to_string(options.k) +
                                         " exceeds the number of samples (" +
                                         std::to_string(total_rows) + ")");
  }
  if (options.num_threads < 0) {
    return KernelStatus::InvalidArgument("num_threads must be >= 0");
  }
  const int path = static_cast<int>(options.cuda_path);
  if (path < 0 || path > static_cast<int>(CudaScanPath::kTensorCore)) {
    return KernelStatus::InvalidArgument("unknown CUDA scan path " +
                                         std::to_string(path));
  }
  return KernelStatus::Ok();
}

KernelStatus ChooseCpuScanIsa(CpuIsa requested, DType dtype, CpuIsa* chosen) {
  RETRACE_KERNEL_RETURN_IF_ERROR(ResolveCpuIsa(requested, chosen));
  if (*chosen == CpuIsa::kAmx) {
    const bool matrix_unit =
        dtype == DType::kBF16 ||
        (dtype == DType::kF16 && requested == CpuIsa::kAmx);
    if (!matrix_unit) *chosen = CpuIsa::kAvx512;
  }
  return KernelStatus::Ok();
}

KernelStatus ChooseCudaScanPath(const StoreLayout& layout,
                                CudaScanPath requested, CudaScanPath* chosen) {
  if (chosen == nullptr) {
    return KernelStatus::InvalidArgument("chosen pointer is null");
  }
  const bool sixteen_bit =
      layout.dtype == DType::kF16 || layout.dtype == DType::kBF16;
  switch (requested) {
    case CudaScanPath::kAuto:
      *chosen = sixteen_bit && layout.dim >= kTensorCoreMinDim
                    ? CudaScanPath::kTensorCore
                    : CudaScanPath::kFp32;
      return KernelStatus::Ok();
    case CudaScanPath::kFp32:
      *chosen = CudaScanPath::kFp32;
      return KernelStatus::Ok();
    case CudaScanPath::kTensorCore:
      if (!sixteen_bit) {
        return KernelStatus::InvalidArgument(
            std::string("the tensor-core scan needs an F16 or BF16 store, "
                        "this one is ") +
            DTypeName(layout.dtype));
      }
      *chosen = CudaScanPath::kTensorCore;
      return KernelStatus::Ok();
  }
  return KernelStatus::InvalidArgument(
      "unknown CUDA scan path " + std::to_string(static_cast<int>(requested)));
}

const char* CudaScanPathName(CudaScanPath path) {
  switch (path) {
    case CudaScanPath::kAuto:
      return "auto";
    case CudaScanPath::kFp32:
      return "fp32";
    case CudaScanPath::kTensorCore:
      return "tensor-core";
  }
  return "unknown";
}

KernelStatus ScanCpu(const StoreLayout& layout,
                     const std::vector<StoreChunk>& chunks,
                     const QueryBatch& queries, const ScanOptions& options,
                     ScanResult* result) {
  if (result == nullptr) {
    return KernelStatus::InvalidArgument("result pointer is null");
  }
  RETRACE_KERNEL_RETURN_IF_ERROR(
      ValidateScan(layout, chunks, queries, options));
  try {
    return ScanCpuImpl(layout, chunks, queries, options, result);
  } catch (const std::bad_alloc&) {
    return KernelStatus::OutOfMemory("scan: host allocation failed");
  } catch (const std::length_error&) {
    return KernelStatus::OutOfMemory("scan: host allocation too large");
  }
}

KernelStatus MergeScanResults(const std::vector<ScanResult>& parts, int32_t k,
                              ScanResult* merged) {
  if (merged == nullptr) {
    return KernelStatus::InvalidArgument("merged pointer is null");
  }
  if (parts.empty())
    return KernelStatus::InvalidArgument("no results to merge");
  if (k < 1 || k > kMaxTopK) {
    return KernelStatus::InvalidArgument("k = " + std::to_string(k) +
                                         " is out of range 1.." +
                                         std::to_string(kMaxTopK));
  }
  const size_t nq = parts[0].per_query.size();
  for (size_t p = 0; p < parts.size(); ++p) {
    if (parts[p].per_query.size() != nq || nq == 0) {
      return KernelStatus::InvalidArgument(
          "result " + std::to_string(p) + " has " +
          std::to_string(parts[p].per_query.size()) + " queries, expected " +
          std::to_string(nq) + " (and at least 1)");
    }
  }
  ScanResult out;
  out.per_query.assign(nq, {});
  std::vector<std::pair<uint64_t, const ScoredSample*>> all;
  for (size_t q = 0; q < nq; ++q) {
    for (int m = 0; m < kNumMethods; ++m) {
      for (int bottom = 0; bottom < 2; ++bottom) {
        all.clear();
        for (const ScanResult& part : parts) {
          const RankedList& list = part.per_query[q][size_t(m)];
          for (const ScoredSample& s : bottom ? list.bottom : list.top) {
            if (s.index < 0 || s.index >= kMaxSamples) {
              return KernelStatus::InvalidArgument(
                  "sample index " + std::to_string(s.index) + " out of range");
            }
            all.emplace_back(PackCandidate(RankKey(s.score, !bottom), s.index),
                             &s);
          }
        }
        if (all.empty()) continue;  // lists not asked for (bottom)
        if (all.size() < size_t(k)) {
          return KernelStatus::InvalidArgument(
              "k = " + std::to_string(k) + " exceeds the " +
              std::to_string(all.size()) + " samples in the merged results");
        }
        std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
          return a.first > b.first;
        });
        for (size_t i = 1; i < all.size(); ++i) {
          if (CandidateIndex(all[i].first) ==
              CandidateIndex(all[i - 1].first)) {
            return KernelStatus::InvalidArgument(
                "sample " + std::to_string(CandidateIndex(all[i].first)) +
                " appears in more than one merged result");
          }
        }
        std::vector<ScoredSample>& dst =
            bottom ? out.per_query[q][size_t(m)].bottom
                   : out.per_query[q][size_t(m)].top;
        dst.reserve(size_t(k));
        for (size_t i = 0; i < size_t(k); ++i) dst.push_back(*all[i].second);
      }
    }
  }
  *merged = std::move(out);
  return KernelStatus::Ok();
}

#ifndef RETRACE_HAVE_CUDA
// Builds without CUDA keep the same header; the device entry points say why
// they cannot run.
KernelStatus CudaScanScratchBytes(const StoreLayout&,
                                  const std::vector<StoreChunk>&, int32_t,
                                  const ScanOptions&, size_t*) {
  return KernelStatus::Unavailable(
      "built without CUDA (RETRACE_WITH_CUDA=OFF)");
}

KernelStatus ScanCuda(const StoreLayout&, const std::vector<StoreChunk>&,
                      const QueryBatch&, const ScanOptions&, void*, size_t,
                      CUstream_st*, ScanResult*) {
  return KernelStatus::Unavailable(
      "built without CUDA (RETRACE_WITH_CUDA=OFF)");
}

KernelStatus CudaSelfTest() {
  return KernelStatus::Unavailable(
      "built without CUDA (RETRACE_WITH_CUDA=OFF)");
}
#endif  // RETRACE_HAVE_CUDA

}  // namespace retrace::kernels

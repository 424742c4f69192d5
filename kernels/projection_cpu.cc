// CPU backend of the random projection (and the reference for the CUDA one),
// the shared argument checks, the Projector, and the CUDA stubs of a build
// without CUDA.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/device.h"
#include "kernels/philox.h"
#include "kernels/projection.h"
#include "kernels/projection_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RETRACE_PROJECTION_X86 1
#endif

namespace retrace::kernels {

namespace pi = projection_internal;

// Defined in projection.cu when CUDA is compiled in.
#ifdef RETRACE_HAVE_CUDA
KernelStatus AllocateProjectionAccumulatorCuda(int64_t words, uint64_t** out);
void FreeProjectionAccumulatorCuda(uint64_t* accumulator);
#endif

namespace projection_internal {

KernelStatus ValidateAccumulateArgs(const ProjectionSpec& spec,
                                    const float* values, int64_t batch,
                                    int64_t len, int64_t row_stride,
                                    int64_t global_offset, double input_scale,
                                    const uint64_t* accumulator) {
  RETRACE_KERNEL_RETURN_IF_ERROR(ValidateProjectionSpec(spec));
  if (batch < 1 || batch > kMaxProjectionBatch) {
    return KernelStatus::InvalidArgument("projection batch must be in 1.." +
                                         std::to_string(kMaxProjectionBatch) +
                                         ", got " + std::to_string(batch));
  }
  if (len < 0) {
    return KernelStatus::InvalidArgument(
        "projection piece length must be >= 0, got " + std::to_string(len));
  }
  if (global_offset < 0) {
    return KernelStatus::InvalidArgument(
        "projection global_offset must be >= 0, got " +
        std::to_string(global_offset));
  }
  if (row_stride < len) {
    return KernelStatus::InvalidArgument(
        "projection row_stride (" + std::to_string(row_stride) +
        ") must be >= the piece length (" + std::to_string(len) + ")");
  }
  if (global_offset > std::numeric_limits<int64_t>::max() - len) {
    return KernelStatus::InvalidArgument(
        "projection global_offset + len overflows int64");
  }
  if (spec.input_dim > 0 && global_offset + len > spec.input_dim) {
    return KernelStatus::InvalidArgument(
        "projection piece [" + std::to_string(global_offset) + ", " +
        std::to_string(global_offset + len) +
        ") reaches beyond the declared input dimension p = " +
        std::to_string(spec.input_dim));
  }
  if (!std::isfinite(input_scale)) {
    return KernelStatus::InvalidArgument(
        "projection input_scale must be finite");
  }
  if (accumulator == nullptr) {
    return KernelStatus::InvalidArgument("projection accumulator is null");
  }
  if (values == nullptr && len > 0) {
    return KernelStatus::InvalidArgument("projection values pointer is null");
  }
  return KernelStatus::Ok();
}

KernelStatus ValidateFinalizeArgs(const ProjectionSpec& spec,
                                  const uint64_t* accumulator, int64_t batch,
                                  const float* output) {
  RETRACE_KERNEL_RETURN_IF_ERROR(ValidateProjectionSpec(spec));
  if (batch < 1 || batch > kMaxProjectionBatch) {
    return KernelStatus::InvalidArgument("projection batch must be in 1.." +
                                         std::to_string(kMaxProjectionBatch) +
                                         ", got " + std::to_string(batch));
  }
  if (accumulator == nullptr) {
    return KernelStatus::InvalidArgument("projection accumulator is null");
  }
  if (output == nullptr) {
    return KernelStatus::InvalidArgument("projection output is null");
  }
  return KernelStatus::Ok();
}

KernelStatus FlagsToStatus(const uint64_t* flags, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    const uint64_t f = flags[b];
    if (f == 0) continue;
    std::string what;
    if (f & kFlagNonFinite) {
      what = "a NaN or Inf value (after input_scale)";
    } else if (f & kFlagTooLarge) {
      what = "an element with |x * input_scale| > 2^19";
    } else {
      what =
          "an L1 norm sum(|x * input_scale|) >= 2^31, which could overflow the "
          "fixed-point accumulator; pre-normalize with input_scale (e.g. "
          "1/||x||)";
    }
    return KernelStatus::InvalidArgument(
        "projection input vector " + std::to_string(b) + " has " + what +
        "; reset the accumulator before reusing it");
  }
  return KernelStatus::Ok();
}

}  // namespace projection_internal

namespace {

// Coordinates quantized and hashed together: small enough for L1 cache.
constexpr int64_t kTile = 256;
// Below this many coordinates per thread, a thread costs more than it saves.
constexpr int64_t kMinCoordinatesPerThread = 16384;

struct AccumulatorParts {
  uint64_t* sums;   // [D][B]: sums[j·B + b]
  uint64_t* l1;     // [B]
  uint64_t* flags;  // [B]
};

AccumulatorParts Parts(uint64_t* acc, int64_t d, int64_t batch) {
  return {acc, acc + d * batch, acc + d * batch + batch};
}

// Runs task(0..n-1), task 0 on the calling thread. A thread that cannot be
// started runs its task on the caller instead, so the work always completes.
void RunParallel(int n, const std::function<void(int)>& task) {
  std::vector<std::thread> threads;
  std::vector<int> inline_tasks;
  threads.reserve(n > 1 ? n - 1 : 0);
  for (int t = 1; t < n; ++t) {
    try {
      threads.emplace_back(task, t);
    } catch (const std::exception&) {
      inline_tasks.push_back(t);
    }
  }
  task(0);
  for (int t : inline_tasks) task(t);
  for (std::thread& th : threads) th.join();
}

// The flags (kFlagNonFinite, kFlagTooLarge) that coordinates [t0, t1) of
// one batch vector x raise: what a quantization loop that saw a bad value
// reports.
uint64_t RangeFlags(const float* x, int64_t t0, int64_t t1, double scale) {
  uint64_t flag = 0;
  for (int64_t t = t0; t < t1; ++t) pi::QuantizeScaled(x[t], scale, &flag);
  return flag;
}

// Quantizes coordinates [t0, t1) of one batch vector x (x[t] is coordinate
// t of the tile) into q[t·B] — q points at this vector's column — and adds
// its L1 units and flags to *l1 / *flags. Same values as
// projection_internal::QuantizeScaled, written without branches so that the
// loop pipelines.
void QuantizeRowTail(const float* x, int64_t t0, int64_t t1, int64_t batch,
                     double scale, int64_t* q, uint64_t* l1, uint64_t* flags) {
  uint64_t units = 0;
  bool bad = false;
  for (int64_t t = t0; t < t1; ++t) {
    const double v = double(x[t]) * scale;
    const bool ok = std::fabs(v) <= kMaxAbsScaledInput;  // false for NaN
    bad |= !ok;
    const int64_t qv = pi::RoundScaledToFixed(ok ? v : 0.0);
    q[t * batch] = qv;
    units += pi::L1Units(qv);  // <= 2^31 · kTile: cannot wrap
  }
  *l1 = pi::SaturatingAdd(*l1, units);
  if (bad) *flags |= RangeFlags(x, t0, t1, scale);
}

// Completes one batch vector's tile after its first n8 coordinates were
// quantized eight at a time, as the generic loop would have counted them:
// adds their L1 units (`units`: <= 2^31 · kTile, no wrap), quantizes
// coordinates [n8, n), and adds the flags of the first n8 when one of them
// was out of range (`bad`).
void FinishVector(const float* x, int64_t n8, int64_t n, int64_t batch,
                  double scale, uint64_t units, bool bad, int64_t* q,
                  uint64_t* l1, uint64_t* flags) {
  *l1 = pi::SaturatingAdd(*l1, units);
  QuantizeRowTail(x, n8, n, batch, scale, q, l1, flags);
  if (bad) *flags |= RangeFlags(x, 0, n8, scale);
}

// Quantizes coordinates [begin, begin+n) of every batch vector into
// q[t·B + b] (coordinate-major, so the scatter reads B contiguous values),
// adding L1 units and flags to l1[b] / flags[b]. Same values as
// projection_internal::QuantizeScaled, written without branches so that the
// loop pipelines (and vectorizes where the target allows).
void QuantizeTile(const float* values, int64_t batch, int64_t row_stride,
                  int64_t begin, int64_t n, double scale, int64_t* q,
                  uint64_t* l1, uint64_t* flags) {
  for (int64_t b = 0; b < batch; ++b) {
    QuantizeRowTail(values + b * row_stride + begin, 0, n, batch, scale, q + b,
                    l1 + b, flags + b);
  }
}

// Adds ±q (B values) to the B sums of one output row; `negative` is 0 or all
// ones, so (q ^ negative) - negative is q or -q without a branch.
inline void AddSigned(uint64_t* __restrict dst, const int64_t* __restrict q,
                      int64_t batch, uint64_t negative) {
  for (int64_t b = 0; b < batch; ++b) {
    dst[b] += (uint64_t(q[b]) ^ negative) - negative;
  }
}

// Whether any of the B quantized values of a coordinate is non-zero (a
// column whose inputs are all zero adds nothing).
inline bool AnyNonZero(const int64_t* q, int64_t batch) {
  bool any = false;
  for (int64_t b = 0; b < batch; ++b) any |= q[b] != 0;
  return any;
}

// Adds the n quantized coordinates of a tile (q[t·B + b]) into the sums:
// coordinate t goes to the s rows sums[row_offsets[t·s + k]] with the signs
// negatives[t·s + k] (0 or all ones).
void ScatterTile(const int64_t* q, int64_t n, int64_t batch, int s,
                 const int64_t* row_offsets, const uint64_t* negatives,
                 uint64_t* sums) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t* qt = q + t * batch;
    if (!AnyNonZero(qt, batch)) continue;
    if (batch == 1) {
      const uint64_t v = uint64_t(qt[0]);
      for (int k = 0; k < s; ++k) {
        const uint64_t neg = negatives[t * s + k];
        sums[row_offsets[t * s + k]] += (v ^ neg) - neg;
      }
    } else {
      for (int k = 0; k < s; ++k) {
        AddSigned(sums + row_offsets[t * s + k], qt, batch,
                  negatives[t * s + k]);
      }
    }
  }
}

#ifdef RETRACE_PROJECTION_X86
#define RETRACE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

// Eight consecutive values of one vector quantized as QuantizeRowTail does:
// the fixed-point values, with `ok` clear for a lane that is NaN, Inf or beyond
// kMaxAbsScaledInput (its value is then 0).
RETRACE_AVX512 inline __m512i Quantize8(const float* x, __m512d scale,
                                        __mmask8* ok) {
  const __m512d v = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x)), scale);
  *ok = _mm512_cmp_pd_mask(_mm512_abs_pd(v), _mm512_set1_pd(kMaxAbsScaledInput),
                           _CMP_LE_OQ);  // false for NaN
  // RoundScaledToFixed: ×2^32 (exact), + 1.5·2^52 rounds to an integer
  // (to nearest, ties to even), whose bits minus the constant's are it.
  const __m512d t = _mm512_add_pd(
      _mm512_mul_pd(_mm512_maskz_mov_pd(*ok, v), _mm512_set1_pd(4294967296.0)),
      _mm512_set1_pd(6755399441055744.0));
  return _mm512_sub_epi64(_mm512_castpd_si512(t),
                          _mm512_set1_epi64(0x4338000000000000));
}

// L1Units of 8 fixed-point values.
RETRACE_AVX512 inline __m512i L1Units8(__m512i q) {
  return _mm512_srli_epi64(
      _mm512_add_epi64(_mm512_abs_epi64(q),
                       _mm512_set1_epi64((int64_t{1} << pi::kL1UnitShift) - 1)),
      pi::kL1UnitShift);
}

// The 8x8 transpose of r[i][j] (row i, coordinate j) into c[j][i].
RETRACE_AVX512 inline void Transpose8x8(const __m512i r[8], __m512i c[8]) {
  __m512i a[8], b[8];
  for (int i = 0; i < 8; i += 2) {  // rows i and i + 1 interleaved
    a[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);      // coords 0 2 4 6
    a[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);  // coords 1 3 5 7
  }
  const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int i = 0; i < 8; i += 4) {  // four rows, coordinates j and j + 4
    b[i] = _mm512_permutex2var_epi64(a[i], lo, a[i + 2]);          // 0, 4
    b[i + 1] = _mm512_permutex2var_epi64(a[i + 1], lo, a[i + 3]);  // 1, 5
    b[i + 2] = _mm512_permutex2var_epi64(a[i], hi, a[i + 2]);      // 2, 6
    b[i + 3] = _mm512_permutex2var_epi64(a[i + 1], hi, a[i + 3]);  // 3, 7
  }
  for (int j = 0; j < 4; ++j) {  // rows 0-3 from b[j], rows 4-7 from b[j + 4]
    c[j] = _mm512_shuffle_i64x2(b[j], b[j + 4], 0x44);
    c[j + 4] = _mm512_shuffle_i64x2(b[j], b[j + 4], 0xEE);
  }
}

// QuantizeTile with AVX-512: eight batch vectors at a time, eight
// coordinates of each converted, scaled and rounded in registers, then
// transposed so that each coordinate's eight values are one store. The
// arithmetic is QuantizeRowTail's (the same double operations in the same
// order), so the values are bit for bit the same.
RETRACE_AVX512 void QuantizeTileAvx512(const float* values, int64_t batch,
                                       int64_t row_stride, int64_t begin,
                                       int64_t n, double scale, int64_t* q,
                                       uint64_t* l1, uint64_t* flags) {
  const __m512d vscale = _mm512_set1_pd(scale);
  const int64_t n8 = n - n % 8;
  int64_t b = 0;
  for (; b + 8 <= batch; b += 8) {
    const float* x = values + b * row_stride + begin;
    __m512i units[8];
    __mmask8 bad[8];
    for (int i = 0; i < 8; ++i) {
      units[i] = _mm512_setzero_si512();
      bad[i] = 0;
    }
    for (int64_t t = 0; t < n8; t += 8) {
      __m512i r[8], c[8];
      for (int i = 0; i < 8; ++i) {
        __mmask8 ok;
        r[i] = Quantize8(x + i * row_stride + t, vscale, &ok);
        bad[i] |= __mmask8(~ok);
        units[i] = _mm512_add_epi64(units[i], L1Units8(r[i]));
      }
      Transpose8x8(r, c);
      for (int j = 0; j < 8; ++j) {
        _mm512_storeu_si512(q + (t + j) * batch + b, c[j]);
      }
    }
    for (int i = 0; i < 8; ++i) {
      FinishVector(x + i * row_stride, n8, n, batch, scale,
                   uint64_t(_mm512_reduce_add_epi64(units[i])), bad[i] != 0,
                   q + b + i, l1 + b + i, flags + b + i);
    }
  }
  if (batch == 1) {  // one vector (a query): its values are contiguous in q
    const float* x = values + begin;
    __m512i units = _mm512_setzero_si512();
    __mmask8 bad = 0;
    for (int64_t t = 0; t < n8; t += 8) {
      __mmask8 ok;
      const __m512i r = Quantize8(x + t, vscale, &ok);
      bad |= __mmask8(~ok);
      units = _mm512_add_epi64(units, L1Units8(r));
      _mm512_storeu_si512(q + t, r);
    }
    FinishVector(x, n8, n, 1, scale, uint64_t(_mm512_reduce_add_epi64(units)),
                 bad != 0, q, l1, flags);
    return;
  }
  for (; b < batch; ++b) {
    QuantizeRowTail(values + b * row_stride + begin, 0, n, batch, scale, q + b,
                    l1 + b, flags + b);
  }
}

// ScatterTile with AVX-512: each block of eight batch values is loaded once
// and added, signed, to its s rows. Integer adds: the same sums as the
// generic path.
RETRACE_AVX512 void ScatterTileAvx512(const int64_t* q, int64_t n,
                                      int64_t batch, int s,
                                      const int64_t* row_offsets,
                                      const uint64_t* negatives,
                                      uint64_t* sums) {
  if (batch < 8) {  // under one vector of sums: the generic loop is as fast
    ScatterTile(q, n, batch, s, row_offsets, negatives, sums);
    return;
  }
  const __mmask8 tail = __mmask8((1u << (batch % 8)) - 1);
  const int64_t b8 = batch - batch % 8;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t* qt = q + t * batch;
    const int64_t* offsets = row_offsets + t * s;
    const uint64_t* negs = negatives + t * s;
    __m512i any = _mm512_setzero_si512();
    for (int64_t b = 0; b < b8; b += 8) {
      any = _mm512_or_si512(any, _mm512_loadu_si512(qt + b));
    }
    if (tail != 0) {
      any = _mm512_or_si512(any, _mm512_maskz_loadu_epi64(tail, qt + b8));
    }
    if (_mm512_test_epi64_mask(any, any) == 0) continue;
    __m512i neg[kMaxSjltSparsity];
    for (int k = 0; k < s; ++k) neg[k] = _mm512_set1_epi64(int64_t(negs[k]));
    for (int64_t b = 0; b < b8; b += 8) {
      const __m512i v = _mm512_loadu_si512(qt + b);
      for (int k = 0; k < s; ++k) {
        uint64_t* dst = sums + offsets[k] + b;
        const __m512i sv =
            _mm512_sub_epi64(_mm512_xor_si512(v, neg[k]), neg[k]);
        _mm512_storeu_si512(dst, _mm512_add_epi64(_mm512_loadu_si512(dst), sv));
      }
    }
    if (tail != 0) {
      const __m512i v = _mm512_maskz_loadu_epi64(tail, qt + b8);
      for (int k = 0; k < s; ++k) {
        uint64_t* dst = sums + offsets[k] + b8;
        const __m512i sv =
            _mm512_sub_epi64(_mm512_xor_si512(v, neg[k]), neg[k]);
        _mm512_mask_storeu_epi64(
            dst, tail,
            _mm512_add_epi64(_mm512_maskz_loadu_epi64(tail, dst), sv));
      }
    }
  }
}
#undef RETRACE_AVX512
#endif  // RETRACE_PROJECTION_X86

// The per-tile steps of one instruction set.
using QuantizeTileFn = void (*)(const float*, int64_t, int64_t, int64_t,
                                int64_t, double, int64_t*, uint64_t*,
                                uint64_t*);
using ScatterTileFn = void (*)(const int64_t*, int64_t, int64_t, int,
                               const int64_t*, const uint64_t*, uint64_t*);
struct TileOps {
  QuantizeTileFn quantize = &QuantizeTile;
  ScatterTileFn scatter = &ScatterTile;
};

// kAvx512 has its own quantize and scatter, which kAmx runs too (the
// projection has no matrix-unit path); kAvx2 has none (the generic loops,
// which the compiler vectorizes for the build's baseline).
TileOps OpsFor(CpuIsa isa) {
  TileOps ops;
#ifdef RETRACE_PROJECTION_X86
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAmx) {
    ops.quantize = &QuantizeTileAvx512;
    ops.scatter = &ScatterTileAvx512;
  }
#else
  (void)isa;
#endif
  return ops;
}

// Philox-4x32-10 of kLanes counters at once. Laid out as structure of
// arrays so that the compiler interleaves (or vectorizes) the independent
// multiply chains: one Philox alone is latency-bound, about 3x slower per
// counter. Bit-identical to Philox4x32x10 (the reference tests would see
// any difference in the matrix).
constexpr int kLanes = 16;
struct PhiloxLanes {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
};

// Counters {lo(first + l), hi(first + l), word2, domain} for l < kLanes,
// hashed under the seed.
void HashLanes(uint64_t seed, uint64_t first, uint32_t word2, uint32_t domain,
               PhiloxLanes* out) {
  PhiloxLanes& s = *out;
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t coordinate = first + uint64_t(l);
    s.c0[l] = pi::Lo32(coordinate);
    s.c1[l] = pi::Hi32(coordinate);
    s.c2[l] = word2;
    s.c3[l] = domain;
  }
  uint32_t k0 = pi::Lo32(seed), k1 = pi::Hi32(seed);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = uint64_t{kPhiloxMul0} * s.c0[l];
      const uint64_t p1 = uint64_t{kPhiloxMul1} * s.c2[l];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ s.c1[l] ^ k0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ s.c3[l] ^ k1;
      s.c1[l] = uint32_t(p1);
      s.c3[l] = uint32_t(p0);
      s.c0[l] = n0;
      s.c2[l] = n2;
    }
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
}

// Word w of lane l.
inline uint32_t LaneWord(const PhiloxLanes& s, int w, int l) {
  switch (w) {
    case 0:
      return s.c0[l];
    case 1:
      return s.c1[l];
    case 2:
      return s.c2[l];
    default:
      return s.c3[l];
  }
}

// SJLT over coordinates [begin, end) of the piece into `sums` ([D][B]).
// Same rows and signs as projection_internal::SjltColumn, hashed kLanes
// columns at a time.
void SjltRange(const ProjectionSpec& spec, const float* values, int64_t batch,
               int64_t row_stride, int64_t begin, int64_t end,
               uint64_t global_offset, double scale, const TileOps& ops,
               uint64_t* sums, uint64_t* l1, uint64_t* flags) {
  const int s = spec.sparsity;
  const pi::SjltBlocks blocks = pi::MakeSjltBlocks(spec);
  std::vector<int64_t> q(kTile * batch);
  std::vector<int64_t> row_offsets(kTile * s);
  std::vector<uint64_t> negatives(kTile * s);
  PhiloxLanes lanes;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t n = std::min(kTile, end - tile);
    ops.quantize(values, batch, row_stride, tile, n, scale, q.data(), l1,
                 flags);
    const uint64_t first = global_offset + uint64_t(tile);
    for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
      for (int call = 0; call * 4 < s; ++call) {
        HashLanes(spec.seed, first + uint64_t(t0), uint32_t(call),
                  pi::kSjltDomain, &lanes);
        for (int l = 0; l < kLanes && t0 + l < n; ++l) {
          const int64_t t = t0 + l;
          for (int k = call * 4; k < std::min(s, call * 4 + 4); ++k) {
            const uint32_t w = LaneWord(lanes, k - call * 4, l);
            const uint32_t row =
                blocks.begin[k] +
                uint32_t((uint64_t(w >> 1) * blocks.size[k]) >> 31);
            row_offsets[t * s + k] = int64_t(row) * batch;
            negatives[t * s + k] = uint64_t(0) - (w & 1u);
          }
        }
      }
    }
    ops.scatter(q.data(), n, batch, s, row_offsets.data(), negatives.data(),
                sums);
  }
}

// Dense Rademacher, all coordinates of the piece, row groups
// [group_begin, group_end) of 128 rows each. Each thread owns whole rows, so
// threads never write the same sum.
void RademacherGroups(const ProjectionSpec& spec, const float* values,
                      int64_t batch, int64_t row_stride, int64_t len,
                      uint64_t global_offset, double scale, int64_t group_begin,
                      int64_t group_end, const TileOps& ops, uint64_t* sums,
                      uint64_t* l1, uint64_t* flags) {
  const int64_t d = spec.output_dim;
  std::vector<int64_t> q(kTile * batch);
  PhiloxLanes lanes;
  for (int64_t tile = 0; tile < len; tile += kTile) {
    const int64_t n = std::min(kTile, len - tile);
    ops.quantize(values, batch, row_stride, tile, n, scale, q.data(), l1,
                 flags);
    for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
      for (int64_t g = group_begin; g < group_end; ++g) {
        HashLanes(spec.seed, global_offset + uint64_t(tile + t0), uint32_t(g),
                  pi::kRademacherDomain, &lanes);
        const int64_t row0 = g * pi::kRademacherRowsPerBlock;
        const int64_t rows = std::min(pi::kRademacherRowsPerBlock, d - row0);
        uint64_t* dst = sums + row0 * batch;
        for (int l = 0; l < kLanes && t0 + l < n; ++l) {
          const int64_t* qt = q.data() + (t0 + l) * batch;
          if (!AnyNonZero(qt, batch)) continue;
          const uint32_t bits[4] = {lanes.c0[l], lanes.c1[l], lanes.c2[l],
                                    lanes.c3[l]};
          if (batch == 1) {
            // One vector, the common query case: no inner batch loop.
            const uint64_t v = uint64_t(qt[0]);
            for (int64_t r = 0; r < rows; ++r) {
              const uint64_t neg =
                  uint64_t(0) - ((bits[r >> 5] >> (r & 31)) & 1u);
              dst[r] += (v ^ neg) - neg;
            }
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              const uint64_t neg =
                  uint64_t(0) - ((bits[r >> 5] >> (r & 31)) & 1u);
              AddSigned(dst + r * batch, qt, batch, neg);
            }
          }
        }
      }
    }
  }
}

// Adds a call's L1 units to the running counters and raises kFlagL1 when a
// counter reaches the limit. Saturating, so the decision depends only on the
// total, not on how the input was split.
void MergeL1(const uint64_t* call_l1, int64_t batch, uint64_t* l1,
             uint64_t* flags) {
  for (int64_t b = 0; b < batch; ++b) {
    l1[b] = pi::SaturatingAdd(l1[b], call_l1[b]);
    if (l1[b] >= pi::kL1Limit) flags[b] |= pi::kFlagL1;
  }
}

}  // namespace

const char* ProjectionTypeName(ProjectionType type) {
  return type == ProjectionType::kRademacher ? "rademacher" : "sjlt";
}

bool ParseProjectionType(const std::string& name, ProjectionType* out) {
  if (name == "sjlt") {
    *out = ProjectionType::kSjlt;
    return true;
  }
  if (name == "rademacher") {
    *out = ProjectionType::kRademacher;
    return true;
  }
  return false;
}

KernelStatus ValidateProjectionSpec(const ProjectionSpec& spec) {
  if (spec.type != ProjectionType::kSjlt &&
      spec.type != ProjectionType::kRademacher) {
    return KernelStatus::InvalidArgument("unknown projection type " +
                                         std::to_string(int(spec.type)));
  }
  if (spec.output_dim < 1 || spec.output_dim > kMaxProjectionDim) {
    return KernelStatus::InvalidArgument(
        "projection output dimension D must be in 1.." +
        std::to_string(kMaxProjectionDim) + ", got " +
        std::to_string(spec.output_dim));
  }
  if (spec.type == ProjectionType::kSjlt) {
    if (spec.sparsity < 1 || spec.sparsity > kMaxSjltSparsity) {
      return KernelStatus::InvalidArgument(
          "SJLT sparsity s must be in 1.." + std::to_string(kMaxSjltSparsity) +
          ", got " + std::to_string(spec.sparsity));
    }
    if (spec.sparsity > spec.output_dim) {
      return KernelStatus::InvalidArgument(
          "SJLT sparsity s = " + std::to_string(spec.sparsity) +
          " exceeds the output dimension D = " +
          std::to_string(spec.output_dim) +
          " (each input coordinate needs s distinct rows)");
    }
  }
  if (spec.input_dim < 0) {
    return KernelStatus::InvalidArgument(
        "projection input dimension p must be >= 0 (0 = undeclared), got " +
        std::to_string(spec.input_dim));
  }
  return KernelStatus::Ok();
}

int64_t ProjectionAccumulatorWords(const ProjectionSpec& spec, int64_t batch) {
  if (!ValidateProjectionSpec(spec).ok() || batch < 1 ||
      batch > kMaxProjectionBatch) {
    return -1;
  }
  return spec.output_dim * batch + 2 * batch;
}

KernelStatus ProjectResetCpu(const ProjectionSpec& spec, int64_t batch,
                             uint64_t* accumulator) {
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
  std::memset(accumulator, 0, size_t(words) * sizeof(uint64_t));
  return KernelStatus::Ok();
}

KernelStatus ProjectAccumulateCpu(const ProjectionSpec& spec,
                                  const float* values, int64_t batch,
                                  int64_t len, int64_t row_stride,
                                  int64_t global_offset, double input_scale,
                                  uint64_t* accumulator, int num_threads,
                                  CpuIsa isa) {
  RETRACE_KERNEL_RETURN_IF_ERROR(
      pi::ValidateAccumulateArgs(spec, values, batch, len, row_stride,
                                 global_offset, input_scale, accumulator));
  CpuIsa chosen = CpuIsa::kScalar;
  RETRACE_KERNEL_RETURN_IF_ERROR(ResolveCpuIsa(isa, &chosen));
  const TileOps ops = OpsFor(chosen);
  if (num_threads < 0) {
    return KernelStatus::InvalidArgument(
        "projection num_threads must be >= 0 (0 = all cores), got " +
        std::to_string(num_threads));
  }
  if (len == 0) return KernelStatus::Ok();
  const int max_threads = num_threads == 0 ? CpuThreads() : num_threads;
  const int64_t d = spec.output_dim;
  const AccumulatorParts acc = Parts(accumulator, d, batch);
  const uint64_t offset = uint64_t(global_offset);

  try {
    int threads = 1;
    std::vector<std::vector<uint64_t>> l1(1), flags(1);
    if (spec.type == ProjectionType::kSjlt) {
      // Split the coordinates; each extra thread sums into a private copy of
      // the D·B sums, merged afterwards (integer adds: the merge order does
      // not matter). Worth it only when a chunk outweighs that copy.
      const int64_t min_chunk =
          std::max(kMinCoordinatesPerThread, 4 * d / spec.sparsity);
      threads = int(std::clamp<int64_t>(len / min_chunk, 1, max_threads));
      l1.assign(threads, std::vector<uint64_t>(batch, 0));
      flags.assign(threads, std::vector<uint64_t>(batch, 0));
      std::vector<std::vector<uint64_t>> private_sums(threads - 1);
      for (auto& p : private_sums) p.assign(size_t(d * batch), 0);
      RunParallel(threads, [&](int t) {
        const int64_t begin = len * t / threads;
        const int64_t end = len * (t + 1) / threads;
        uint64_t* sums = t == 0 ? acc.sums : private_sums[t - 1].data();
        SjltRange(spec, values, batch, row_stride, begin, end, offset,
                  input_scale, ops, sums, l1[t].data(), flags[t].data());
      });
      for (const auto& p : private_sums) {
        for (int64_t e = 0; e < d * batch; ++e) acc.sums[e] += p[e];
      }
    } else {
      // Split the 128-row groups; only the thread holding group 0 counts L1
      // and flags, so each input value is counted once.
      const int64_t groups =
          (d + pi::kRademacherRowsPerBlock - 1) / pi::kRademacherRowsPerBlock;
      const int64_t work = len * d;
      threads = int(std::clamp<int64_t>(
          std::min<int64_t>(groups, work / (kMinCoordinatesPerThread * 128)), 1,
          max_threads));
      l1.assign(threads, std::vector<uint64_t>(batch, 0));
      flags.assign(threads, std::vector<uint64_t>(batch, 0));
      RunParallel(threads, [&](int t) {
        RademacherGroups(spec, values, batch, row_stride, len, offset,
                         input_scale, groups * t / threads,
                         groups * (t + 1) / threads, ops, acc.sums,
                         l1[t].data(), flags[t].data());
      });
      threads = 1;  // the other threads' L1 counts duplicate thread 0's
    }
    std::vector<uint64_t> call_l1(batch, 0);
    for (int t = 0; t < threads; ++t) {
      for (int64_t b = 0; b < batch; ++b) {
        call_l1[b] = pi::SaturatingAdd(call_l1[b], l1[t][b]);
        acc.flags[b] |= flags[t][b];
      }
    }
    MergeL1(call_l1.data(), batch, acc.l1, acc.flags);
    // Also reports flags left by earlier calls: a bad accumulator stays bad.
    return pi::FlagsToStatus(acc.flags, batch);
  } catch (const std::bad_alloc&) {
    return KernelStatus::OutOfMemory(
        "projection: cannot allocate CPU scratch memory");
  }
}

KernelStatus ProjectFinalizeCpu(const ProjectionSpec& spec,
                                const uint64_t* accumulator, int64_t batch,
                                float* output) {
  RETRACE_KERNEL_RETURN_IF_ERROR(
      pi::ValidateFinalizeArgs(spec, accumulator, batch, output));
  const int64_t d = spec.output_dim;
  const uint64_t* sums = accumulator;
  const uint64_t* flags = accumulator + d * batch + batch;
  const double factor = pi::OutputFactor(spec);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < d; ++j) {
      output[b * d + j] = float(double(int64_t(sums[j * batch + b])) * factor);
    }
  }
  return pi::FlagsToStatus(flags, batch);
}

// ---- Projector --------------------------------------------------------------

Projector::Projector(const ProjectionSpec& spec, int64_t batch, Backend backend,
                     CudaStream stream)
    : spec_(spec), batch_(batch), backend_(backend), stream_(stream) {}

Projector::~Projector() {
#ifdef RETRACE_HAVE_CUDA
  if (device_accumulator_ != nullptr) {
    FreeProjectionAccumulatorCuda(device_accumulator_);
  }
#endif
}

KernelStatus Projector::Create(const ProjectionSpec& spec, int64_t batch,
                               Backend backend, CudaStream stream,
                               std::unique_ptr<Projector>* out) {
  if (out == nullptr) {
    return KernelStatus::InvalidArgument("Projector::Create: out is null");
  }
  RETRACE_KERNEL_RETURN_IF_ERROR(ValidateProjectionSpec(spec));
  const int64_t words = ProjectionAccumulatorWords(spec, batch);
  if (words < 0) {
    return KernelStatus::InvalidArgument("projection batch must be in 1.." +
                                         std::to_string(kMaxProjectionBatch) +
                                         ", got " + std::to_string(batch));
  }
  std::unique_ptr<Projector> p(new Projector(spec, batch, backend, stream));
  if (backend == Backend::kCpu) {
    try {
      p->host_accumulator_.assign(size_t(words), 0);
    } catch (const std::bad_alloc&) {
      return KernelStatus::OutOfMemory(
          "projection: cannot allocate the host accumulator");
    }
  } else {
    if (!CudaDeviceAvailable()) {
      return KernelStatus::Unavailable("projection on CUDA: " +
                                       CudaAvailabilityReason());
    }
#ifdef RETRACE_HAVE_CUDA
    RETRACE_KERNEL_RETURN_IF_ERROR(
        AllocateProjectionAccumulatorCuda(words, &p->device_accumulator_));
    RETRACE_KERNEL_RETURN_IF_ERROR(p->Reset());
#endif
  }
  *out = std::move(p);
  return KernelStatus::Ok();
}

KernelStatus Projector::Reset() {
  if (backend_ == Backend::kCpu) {
    return ProjectResetCpu(spec_, batch_, host_accumulator_.data());
  }
  return ProjectResetCuda(spec_, batch_, device_accumulator_, stream_);
}

KernelStatus Projector::Accumulate(const float* values, int64_t len,
                                   int64_t row_stride, int64_t global_offset,
                                   double input_scale) {
  if (backend_ == Backend::kCpu) {
    return ProjectAccumulateCpu(spec_, values, batch_, len, row_stride,
                                global_offset, input_scale,
                                host_accumulator_.data());
  }
  return ProjectAccumulateCuda(spec_, values, batch_, len, row_stride,
                               global_offset, input_scale, device_accumulator_,
                               stream_);
}

KernelStatus Projector::Finalize(float* output) {
  if (backend_ == Backend::kCpu) {
    return ProjectFinalizeCpu(spec_, host_accumulator_.data(), batch_, output);
  }
  return ProjectFinalizeCuda(spec_, device_accumulator_, batch_, output,
                             stream_);
}

// ---- CUDA entry points of a build without CUDA
// -------------------------------
#ifndef RETRACE_HAVE_CUDA

namespace {
KernelStatus NoCuda() {
  return KernelStatus::Unavailable(
      "projection on CUDA: built without CUDA (RETRACE_WITH_CUDA=OFF)");
}
}  // namespace

KernelStatus ProjectResetCuda(const ProjectionSpec&, int64_t, uint64_t*,
                              CudaStream) {
  return NoCuda();
}

KernelStatus ProjectAccumulateCuda(const ProjectionSpec&, const float*, int64_t,
                                   int64_t, int64_t, int64_t, double, uint64_t*,
                                   CudaStream) {
  return NoCuda();
}

KernelStatus ProjectFinalizeCuda(const ProjectionSpec&, const uint64_t*,
                                 int64_t, float*, CudaStream) {
  return NoCuda();
}

#endif  // RETRACE_HAVE_CUDA

}  // namespace retrace::kernels

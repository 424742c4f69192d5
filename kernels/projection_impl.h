// Internal to retrace_kernels: the projection matrix definition and the
// fixed-point format shared by projection_cpu.cc and projection.cu, so that
// both backends compute the same bits. docs/projection.md is the normative
// description; tests rebuild the matrix from it independently.
#ifndef RETRACE_KERNELS_PROJECTION_IMPL_H_
#define RETRACE_KERNELS_PROJECTION_IMPL_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernel_status.h"
#include "kernels/philox.h"
#include "kernels/projection.h"

namespace retrace::kernels::projection_internal {

// Counter word 3 separates the two matrix types, so that the same seed gives
// unrelated bits to each ("SJLT" and "RADE" in ASCII).
inline constexpr uint32_t kSjltDomain = 0x534A4C54u;
inline constexpr uint32_t kRademacherDomain = 0x52414445u;
// One Philox block (128 bits) gives the signs of 128 consecutive rows.
inline constexpr int64_t kRademacherRowsPerBlock = 128;

// Error flags of one batch vector (sticky until Reset).
inline constexpr uint64_t kFlagNonFinite = 1;
inline constexpr uint64_t kFlagTooLarge = 2;
inline constexpr uint64_t kFlagL1 = 4;

// L1 tracking: each element adds ceil(|q| / 2^20) (units of 2^-12), at most
// 2^31 per element since |q| <= 2^51. The vector is refused once the total
// reaches 2^43 units (= 2^31 = kMaxScaledInputL1 in input units); below
// that, Σ|q| < 2^63, so no sum can leave int64.
inline constexpr int kL1UnitShift = 20;
inline constexpr uint64_t kL1Limit = uint64_t{1} << 43;

RETRACE_HD uint32_t Lo32(uint64_t x) { return uint32_t(x); }
RETRACE_HD uint32_t Hi32(uint64_t x) { return uint32_t(x >> 32); }

// The SJLT row blocks: block k is [begin[k], begin[k] + size[k]) with
// begin[k] = floor(k·D/s). Computed once per call, since the divisions cost
// more than the hashing.
struct SjltBlocks {
  int sparsity;
  uint32_t begin[8];
  uint32_t size[8];
};

inline SjltBlocks MakeSjltBlocks(const ProjectionSpec& spec) {
  SjltBlocks blocks{};
  blocks.sparsity = spec.sparsity;
  const uint64_t d = uint64_t(spec.output_dim);
  const uint64_t s = uint64_t(spec.sparsity);
  for (uint64_t k = 0; k < s && k < 8; ++k) {
    blocks.begin[k] = uint32_t(k * d / s);
    blocks.size[k] = uint32_t((k + 1) * d / s - k * d / s);
  }
  return blocks;
}

// Rows (in [0, D)) and signs of the s non-zeros of SJLT column `coordinate`.
// Word w_k of the column's Philox output chooses the row inside block k from
// its upper 31 bits (multiply-shift: begin + floor((w_k >> 1)·size / 2^31))
// and the sign from bit 0 (set = negative). Bit k of *negative_mask is set
// for a negative entry.
RETRACE_HD void SjltColumn(const SjltBlocks& blocks, uint64_t seed,
                           uint64_t coordinate, uint32_t rows[8],
                           uint32_t* negative_mask) {
  uint32_t words[8];
  const Philox4x32Block first = Philox4x32x10(
      Philox4x32Block{{Lo32(coordinate), Hi32(coordinate), 0u, kSjltDomain}},
      Lo32(seed), Hi32(seed));
  words[0] = first.v[0];
  words[1] = first.v[1];
  words[2] = first.v[2];
  words[3] = first.v[3];
  if (blocks.sparsity > 4) {
    const Philox4x32Block second = Philox4x32x10(
        Philox4x32Block{{Lo32(coordinate), Hi32(coordinate), 1u, kSjltDomain}},
        Lo32(seed), Hi32(seed));
    words[4] = second.v[0];
    words[5] = second.v[1];
    words[6] = second.v[2];
    words[7] = second.v[3];
  }
  uint32_t mask = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 8; ++k) {
    if (k >= blocks.sparsity) break;
    const uint32_t w = words[k];
    rows[k] =
        blocks.begin[k] + uint32_t((uint64_t(w >> 1) * blocks.size[k]) >> 31);
    mask |= (w & 1u) << k;
  }
  *negative_mask = mask;
}

// Sign bits of rows [128·group, 128·group + 128) of dense column
// `coordinate`: row 128·group + r is negative when bit (r % 32) of word
// r / 32 is set.
RETRACE_HD Philox4x32Block RademacherSigns(uint64_t seed, uint64_t coordinate,
                                           uint32_t group) {
  return Philox4x32x10(Philox4x32Block{{Lo32(coordinate), Hi32(coordinate),
                                        group, kRademacherDomain}},
                       Lo32(seed), Hi32(seed));
}

// v·2^32 rounded to the nearest integer, ties to even, for
// |v| <= kMaxAbsScaledInput = 2^19 (so |v·2^32| <= 2^51). On the host:
// adding 1.5·2^52 rounds v·2^32 to an integer in the default rounding mode
// (the sum lies in [2^52, 2^53], where doubles are spaced by 1), and the
// integer is then the difference of the bit patterns, which needs no
// conversion instruction and vectorizes. Needs IEEE semantics (no
// -ffast-math). On the device: the same product and __double2ll_rn.
RETRACE_HD int64_t RoundScaledToFixed(double v) {
  const double t = v * 4294967296.0;  // exact: a power of two
#if defined(__CUDA_ARCH__)
  return __double2ll_rn(t);
#else
  constexpr double kMagic = 6755399441055744.0;  // 1.5·2^52
  constexpr int64_t kMagicBits = 0x4338000000000000;
  const double r = t + kMagic;
  int64_t bits;
  std::memcpy(&bits, &r, sizeof(bits));
  return bits - kMagicBits;
#endif
}

// x·scale rounded once to fixed point (2^-32 units, ties to even). Sets
// *flag (kFlagNonFinite / kFlagTooLarge) and returns 0 for a value that is
// not representable. Both backends compute the same bits: one IEEE double
// product, then RoundScaledToFixed.
RETRACE_HD int64_t QuantizeScaled(float x, double scale, uint64_t* flag) {
#if defined(__CUDA_ARCH__)
  const double v = __dmul_rn(double(x), scale);
#else
  const double v = double(x) * scale;
#endif
  const double a = fabs(v);
  if (!(a <= kMaxAbsScaledInput)) {
    *flag |= (a <= 1.7976931348623157e308) ? kFlagTooLarge : kFlagNonFinite;
    return 0;
  }
  return RoundScaledToFixed(v);
}

// Units added to the L1 counter for a quantized value q (|q| <= 2^51).
RETRACE_HD uint64_t L1Units(int64_t q) {
  const uint64_t a = q < 0 ? uint64_t(0) - uint64_t(q) : uint64_t(q);
  return (a + ((uint64_t{1} << kL1UnitShift) - 1)) >> kL1UnitShift;
}

RETRACE_HD uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  const uint64_t s = a + b;
  return s < a ? ~uint64_t{0} : s;
}

// Factor that turns a fixed-point sum into the output value: 2^-32/√s for
// kSjlt, 2^-32/√D for kRademacher. Computed on the host only, so both
// backends multiply by the same double.
inline double OutputFactor(const ProjectionSpec& spec) {
  const double n = spec.type == ProjectionType::kSjlt ? double(spec.sparsity)
                                                      : double(spec.output_dim);
  return std::ldexp(1.0, -kFixedPointFractionBits) / std::sqrt(n);
}

// Host-side argument checks shared by both backends.
KernelStatus ValidateAccumulateArgs(const ProjectionSpec& spec,
                                    const float* values, int64_t batch,
                                    int64_t len, int64_t row_stride,
                                    int64_t global_offset, double input_scale,
                                    const uint64_t* accumulator);
KernelStatus ValidateFinalizeArgs(const ProjectionSpec& spec,
                                  const uint64_t* accumulator, int64_t batch,
                                  const float* output);
// The first flagged batch vector as an InvalidArgument, or Ok.
KernelStatus FlagsToStatus(const uint64_t* flags, int64_t batch);

}  // namespace retrace::kernels::projection_internal

#endif  // RETRACE_KERNELS_PROJECTION_IMPL_H_

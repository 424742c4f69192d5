// Element types of stored vectors and their host-side conversions.
//
// Conversions round to nearest, ties to even (the IEEE default), and are
// usable from both host and device code.
#ifndef RETRACE_KERNELS_DTYPE_H_
#define RETRACE_KERNELS_DTYPE_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RETRACE_HD __host__ __device__ inline
#else
#define RETRACE_HD inline
#endif

namespace retrace::kernels {

enum class DType : int32_t { kF16 = 0, kBF16 = 1, kF32 = 2 };

RETRACE_HD constexpr int64_t DTypeSize(DType t) {
  return t == DType::kF32 ? 4 : 2;
}

// Safetensors / manifest spelling: "F16", "BF16", "F32".
const char* DTypeName(DType t);
// Parses "F16"/"fp16", "BF16"/"bf16", "F32"/"fp32"; false when unknown.
bool ParseDType(const char* name, DType* out);

RETRACE_HD uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
RETRACE_HD float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

RETRACE_HD float Bf16ToFloat(uint16_t h) {
  return BitsFloat(uint32_t(h) << 16);
}

RETRACE_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return uint16_t((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

RETRACE_HD float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    // Subnormal: value = mant * 2^-24.
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

RETRACE_HD uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {                                  // subnormal or zero
    if (abs < 0x33000000u) return uint16_t(sign);           // < 2^-25 -> 0
    uint32_t exp = abs >> 23;
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14..24
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_DTYPE_H_

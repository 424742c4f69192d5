// The GPU scan benchmark's synthetic store and queries, defined so that
// bench/scan_torch.py can rebuild exactly the same values with PyTorch's
// int64 arithmetic (no product passes 2^62, no shift of a negative number),
// and compiled for both the host and the device.
//
// Element i of stream `seed` is SyntheticUniform(i, seed), a multiple of
// 2^-15 in [-1, 1): exact in fp32, so the only rounding on either side is
// the final conversion of a store value to fp16 (round to nearest even).
//   vectors[i]        = fp16(SyntheticUniform(i, kSeedVectors) * kVectorScale)
//                       i = ((n * C + c) * S + s) * D + d
//   norms[i]          = 1.25 + SyntheticUniform(i, kSeedNorms)   i = n*C*S + cs
//   raw[i], unit[i]   = SyntheticUniform(i, kSeedRaw / kSeedUnit)
//                       i = ((q * C + c) * S + s) * D + d
//   tracin / retrac weights[i] = 1 + SyntheticUniform(i, ...) / 2, i = q*C*S+cs
// Query q of a batch that starts at query q0 uses the values of global query
// q0 + q, so a query's data does not depend on how Q is split into batches.
#ifndef RETRACE_BENCH_SYNTHETIC_STORE_H_
#define RETRACE_BENCH_SYNTHETIC_STORE_H_

#include <cstdint>

// The CUDA runtime's stream (cudaStream_t is CUstream_st*).
struct CUstream_st;

#ifdef __CUDACC__
#define RETRACE_HOST_DEVICE __host__ __device__
#else
#define RETRACE_HOST_DEVICE
#endif

namespace retrace::bench {

inline constexpr uint32_t kSeedVectors = 1;
inline constexpr uint32_t kSeedNorms = 2;
inline constexpr uint32_t kSeedRaw = 3;
inline constexpr uint32_t kSeedUnit = 4;
inline constexpr uint32_t kSeedTracinWeights = 5;
inline constexpr uint32_t kSeedRetracWeights = 6;
// A power of two, so that the product with a uniform value is exact.
inline constexpr float kVectorScale = 1.0f / 32.0f;

RETRACE_HOST_DEVICE inline float SyntheticUniform(uint64_t i, uint32_t seed) {
  const uint64_t lo = i & 0x7fffffffu, hi = i >> 31;
  uint64_t h = (lo * 1103515245u + hi * 12345u + uint64_t{seed} * 2654435u) &
               0x7fffffffu;
  h ^= h >> 15;
  h = (h * 0x2c1b3c6du) & 0x7fffffffu;
  h ^= h >> 12;
  h = (h * 0x297a2d39u) & 0x7fffffffu;
  h ^= h >> 15;
  return (float(int32_t(h >> 15)) - 32768.0f) / 32768.0f;
}

RETRACE_HOST_DEVICE inline float SyntheticNorm(uint64_t i) {
  return 1.25f + SyntheticUniform(i, kSeedNorms);
}

RETRACE_HOST_DEVICE inline float SyntheticWeight(uint64_t i, uint32_t seed) {
  return 1.0f + SyntheticUniform(i, seed) * 0.5f;
}

// Device side (bench/synthetic_store.cu, CUDA builds only). Both enqueue on
// `stream` and return the cudaError_t as an int (0 = success).
//
// Fills vectors[rows * row_values] (fp16 bits) and norms[rows * slot_pairs],
// device memory.
int FillSyntheticStoreCuda(uint16_t* vectors, float* norms, int64_t rows,
                           int64_t slot_pairs, int64_t row_values,
                           ::CUstream_st* stream);
// Sums the 16-bit patterns of vectors[0, count) and the 32-bit patterns of
// norms[0, norm_count) as uint64 (mod 2^64) into *sums (device memory, two
// words, zeroed here); the same checksums bench/scan_torch.py prints.
int ChecksumSyntheticStoreCuda(const uint16_t* vectors, int64_t count,
                               const float* norms, int64_t norm_count,
                               unsigned long long* sums, ::CUstream_st* stream);

}  // namespace retrace::bench

#endif  // RETRACE_BENCH_SYNTHETIC_STORE_H_

// Philox-4x32-10, the counter-based generator of Salmon, Moraes, Dror and
// Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
//
// A pure function of a 128-bit counter and a 64-bit key: no state, so the
// host, any GPU and any thread layout draw the same bits for the same
// (counter, key). Usable from host and device code; thread-safe.
#ifndef RETRACE_KERNELS_PHILOX_H_
#define RETRACE_KERNELS_PHILOX_H_

#include <cstdint>

// Same spelling as kernels/dtype.h, so including both is harmless.
#ifndef RETRACE_HD
#if defined(__CUDACC__)
#define RETRACE_HD __host__ __device__ inline
#else
#define RETRACE_HD inline
#endif
#endif

namespace retrace::kernels {

// Four 32-bit words: a counter going in, random bits coming out.
struct Philox4x32Block {
  uint32_t v[4];
};

// Round multipliers and Weyl key increments of Philox-4x32.
inline constexpr uint32_t kPhiloxMul0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxMul1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;
inline constexpr int kPhiloxRounds = 10;

// Philox-4x32-10 of `counter` under key (key0, key1).
RETRACE_HD Philox4x32Block Philox4x32x10(Philox4x32Block counter, uint32_t key0,
                                         uint32_t key1) {
  uint32_t c0 = counter.v[0], c1 = counter.v[1];
  uint32_t c2 = counter.v[2], c3 = counter.v[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    // A 32x32 -> 64-bit product compiles to one wide multiply on the host
    // and to mul.wide.u32 on the device.
    const uint64_t p0 = uint64_t{kPhiloxMul0} * c0;
    const uint64_t p1 = uint64_t{kPhiloxMul1} * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ key0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ key1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    key0 += kPhiloxWeyl0;
    key1 += kPhiloxWeyl1;
  }
  return Philox4x32Block{{c0, c1, c2, c3}};
}

}  // namespace retrace::kernels

#endif  // RETRACE_KERNELS_PHILOX_H_

// Small helpers the benchmark programs share: a monotonic clock in seconds
// and a stateless 64-bit mixer for reproducible synthetic data.
#ifndef RETRACE_BENCH_BENCH_UTIL_H_
#define RETRACE_BENCH_BENCH_UTIL_H_

#include <chrono>
#include <cstdint>

namespace retrace::bench {

// Seconds on the steady clock (only differences mean anything).
inline double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// SplitMix64's output function applied to x + golden ratio: a different,
// well-mixed value for every x.
inline uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace retrace::bench

#endif  // RETRACE_BENCH_BENCH_UTIL_H_

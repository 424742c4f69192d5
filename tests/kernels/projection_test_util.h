// Input data shared by the CPU and GPU projection tests.
#ifndef RETRACE_TESTS_KERNELS_PROJECTION_TEST_UTIL_H_
#define RETRACE_TESTS_KERNELS_PROJECTION_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <vector>

namespace retrace::kernels::testing {

// n standard normal floats from a fixed seed.
inline std::vector<float> RandomInput(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

}  // namespace retrace::kernels::testing

#endif  // RETRACE_TESTS_KERNELS_PROJECTION_TEST_UTIL_H_

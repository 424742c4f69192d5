// The fuzz targets' property check: a violated property aborts, which
// libFuzzer (and driver.cc) report as a crash with the input that caused it.
#ifndef RETRACE_TESTS_FUZZ_REQUIRE_H_
#define RETRACE_TESTS_FUZZ_REQUIRE_H_

#include <cstdlib>

namespace retrace::fuzz {

inline void Require(bool condition) {
  if (!condition) std::abort();
}

}  // namespace retrace::fuzz

#endif  // RETRACE_TESTS_FUZZ_REQUIRE_H_

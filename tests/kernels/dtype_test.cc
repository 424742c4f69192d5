#include "kernels/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace retrace::kernels {
namespace {

// Independent reference: the nearest half value found by scanning all finite
// halves in double precision (ties to the even bit pattern).
uint16_t NearestHalf(float f) {
  double x = f;
  uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    for (uint32_t s : {0u, 0x8000u}) {
      uint16_t bits = uint16_t(h | s);
      double v = HalfToFloat(bits);
      double err = std::fabs(v - x);
      if (err < best_err ||
          (err == best_err && (bits & 1) == 0 && (best & 1) == 1)) {
        best = bits;
        best_err = err;
      }
    }
  }
  return best;
}

TEST(DTypeTest, HalfRoundTripsEveryFiniteValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f) continue;  // inf / NaN
    SCOPED_TRACE(h);
    EXPECT_EQ(FloatToHalf(HalfToFloat(uint16_t(h))), uint16_t(h));
  }
}

TEST(DTypeTest, HalfRoundsToNearest) {
  const float samples[] = {
      0.1f,   -0.3333f, 1e-5f,         6.1e-5f,
      3e-8f,  65519.f,  1.0009765625f, 1.00048828125f /* tie -> even */,
      2.5e-7f};
  for (float f : samples) {
    SCOPED_TRACE(f);
    if ((NearestHalf(f) & 0x7fff) == 0 && f != 0) continue;
    EXPECT_EQ(FloatToHalf(f), NearestHalf(f));
  }
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
}

TEST(DTypeTest, Bf16) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(FloatToBf16(1.00390625f), FloatToBf16(1.0f));  // tie -> even
  EXPECT_FLOAT_EQ(Bf16ToFloat(FloatToBf16(3.14159f)), 3.140625f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(DTypeTest, Names) {
  DType t;
  ASSERT_TRUE(ParseDType("bf16", &t));
  EXPECT_EQ(t, DType::kBF16);
  EXPECT_STREQ(DTypeName(DType::kF16), "F16");
  EXPECT_FALSE(ParseDType("int8", &t));
}

}  // namespace
}  // namespace retrace::kernels

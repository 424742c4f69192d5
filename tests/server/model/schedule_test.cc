// Schedules and the host loss reference against closed-form double-precision
// formulas written out independently here.
#include "server/model/schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "server/model/loss.h"

namespace retrace::model {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kTightRelTol = 1e-12;

double CosineF(double s) {
  return std::pow(std::cos((s + 0.008) / 1.008 * kPi / 2), 2);
}

TEST(ScheduleTest, NamesRoundTrip) {
  for (ScheduleType type : {ScheduleType::kCosine, ScheduleType::kLinear}) {
    EXPECT_EQ(*ParseScheduleType(ScheduleTypeName(type)), type);
  }
  EXPECT_EQ(ParseScheduleType("quadratic").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NoiseSchedule::Create().value().type(), ScheduleType::kCosine);
  EXPECT_EQ(NoiseSchedule::Create().value().num_timesteps(), 1000);
  EXPECT_EQ(NoiseSchedule::Create(ScheduleType::kCosine, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Where no β is clipped, ᾱ_t telescopes to f((t+1)/T)/f(0).
TEST(ScheduleTest, CosineMatchesClosedForm) {
  for (int steps : {1000, 50}) {
    SCOPED_TRACE(testing::Message() << "T=" << steps);
    auto schedule = NoiseSchedule::Create(ScheduleType::kCosine, steps).value();
    bool clipped = false;
    double product = 1.0;
    for (int t = 0; t < steps; ++t) {
      SCOPED_TRACE(testing::Message() << "t=" << t);
      const double raw_beta =
          1 - CosineF((t + 1.0) / steps) / CosineF(double(t) / steps);
      const double beta = std::min(raw_beta, 0.999);
      clipped = clipped || raw_beta > 0.999;
      product *= 1 - beta;
      EXPECT_NEAR(schedule.Beta(t), beta, 1e-15);
      EXPECT_NEAR(schedule.AlphaBar(t), product, kTightRelTol * product);
      if (!clipped) {
        const double closed = CosineF((t + 1.0) / steps) / CosineF(0.0);
        EXPECT_NEAR(schedule.AlphaBar(t), closed, 1e-9 * closed + 1e-15);
      }
      EXPECT_NEAR(schedule.SignalScale(t), std::sqrt(product), 1e-12);
      EXPECT_NEAR(schedule.NoiseScale(t), std::sqrt(1 - product), 1e-12);
    }
    // The last step is the one clipped: f(1) = cos²(π/2) ≈ 0.
    EXPECT_DOUBLE_EQ(schedule.Beta(steps - 1), 0.999);
  }
}

TEST(ScheduleTest, LinearMatchesClosedForm) {
  constexpr int kSteps = 1000;
  auto schedule = NoiseSchedule::Create(ScheduleType::kLinear, kSteps).value();
  // ᾱ_t through a sum of logs in long double (a different evaluation order
  // than the code's running product).
  long double log_sum = 0;
  for (int t = 0; t < kSteps; ++t) {
    SCOPED_TRACE(testing::Message() << "t=" << t);
    const long double beta = 1e-4L + (0.02L - 1e-4L) * t / (kSteps - 1);
    log_sum += std::log1p(-beta);
    EXPECT_NEAR(schedule.Beta(t), static_cast<double>(beta), 1e-15);
    const double expected = static_cast<double>(std::exp(log_sum));
    EXPECT_NEAR(schedule.AlphaBar(t), expected, 1e-11 * expected);
  }
  EXPECT_DOUBLE_EQ(schedule.Beta(0), 1e-4);
  EXPECT_DOUBLE_EQ(schedule.Beta(kSteps - 1), 0.02);
  // DDPM's linear schedule ends at ᾱ ≈ 4.04e-5.
  EXPECT_NEAR(schedule.AlphaBar(kSteps - 1), 4.04e-5, 0.01e-5);
}

TEST(ScheduleTest, AlphaBarDecreasesStrictly) {
  for (ScheduleType type : {ScheduleType::kCosine, ScheduleType::kLinear}) {
    auto schedule = NoiseSchedule::Create(type).value();
    for (int t = 1; t < schedule.num_timesteps(); ++t) {
      ASSERT_LT(schedule.AlphaBar(t), schedule.AlphaBar(t - 1))
          << ScheduleTypeName(type) << " t=" << t;
    }
    EXPECT_GT(schedule.AlphaBar(schedule.num_timesteps() - 1), 0.0);
  }
}

TEST(ScheduleTest, HostAddNoise) {
  auto schedule = NoiseSchedule::Create().value();
  const std::vector<float> x = {1.0f, -0.5f, 0.25f};
  const std::vector<float> eps = {0.3f, 2.0f, -1.0f};
  std::vector<float> x_t(3);
  constexpr int kT = 400;
  ASSERT_TRUE(schedule.AddNoise(x, eps, kT, absl::MakeSpan(x_t)).ok());
  const double abar = CosineF((kT + 1.0) / 1000) / CosineF(0);
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(x_t[i], std::sqrt(abar) * x[i] + std::sqrt(1 - abar) * eps[i],
                1e-6);
  }
  EXPECT_EQ(schedule.AddNoise(x, eps, 1000, absl::MakeSpan(x_t)).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> short_out(2);
  EXPECT_EQ(schedule.AddNoise(x, eps, 0, absl::MakeSpan(short_out)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LossTest, HandComputed) {
  // Differences 0.5, 0, -2, 1: squares sum to 5.25, absolutes to 3.5.
  const std::vector<float> eps = {1.0f, 2.0f, -1.0f, 0.0f};
  const std::vector<float> eps_hat = {0.5f, 2.0f, 1.0f, -1.0f};
  EXPECT_DOUBLE_EQ(*PerExampleLossReference(eps, eps_hat, LossType::kMse),
                   5.25 / 4);
  EXPECT_DOUBLE_EQ(*PerExampleLossReference(eps, eps_hat, LossType::kL1),
                   3.5 / 4);
  EXPECT_EQ(PerExampleLossReference(eps, {}, LossType::kMse).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LossTest, Names) {
  EXPECT_EQ(*ParseLossType("mse"), LossType::kMse);
  EXPECT_EQ(*ParseLossType("l1"), LossType::kL1);
  EXPECT_EQ(LossTypeName(LossType::kL1), "l1");
  EXPECT_EQ(LossPower(LossType::kMse), 2);
  EXPECT_EQ(LossPower(LossType::kL1), 1);
  EXPECT_EQ(ParseLossType("huber").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::model

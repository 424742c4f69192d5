#include "server/model/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace retrace::model {
namespace {

constexpr double kPi = 3.14159265358979323846;

double CosineF(double s) {
  const double angle = (s + NoiseSchedule::kCosineOffset) /
                       (1.0 + NoiseSchedule::kCosineOffset) * kPi / 2.0;
  const double c = std::cos(angle);
  return c * c;
}

std::vector<double> CosineBetas(int num_timesteps) {
  std::vector<double> betas(num_timesteps);
  const double steps = static_cast<double>(num_timesteps);
  for (int t = 0; t < num_timesteps; ++t) {
    const double ratio = CosineF((t + 1) / steps) / CosineF(t / steps);
    betas[t] = std::min(1.0 - ratio, NoiseSchedule::kCosineMaxBeta);
  }
  return betas;
}

std::vector<double> LinearBetas(int num_timesteps) {
  std::vector<double> betas(num_timesteps);
  const double span =
      NoiseSchedule::kLinearBetaEnd - NoiseSchedule::kLinearBetaStart;
  for (int t = 0; t < num_timesteps; ++t) {
    betas[t] = NoiseSchedule::kLinearBetaStart +
               span * static_cast<double>(t) / (num_timesteps - 1);
  }
  return betas;
}

}  // namespace

absl::string_view ScheduleTypeName(ScheduleType type) {
  switch (type) {
    case ScheduleType::kCosine:
      return "cosine";
    case ScheduleType::kLinear:
      return "linear";
  }
  return "unknown";
}

absl::StatusOr<ScheduleType> ParseScheduleType(absl::string_view name) {
  if (name == "cosine") return ScheduleType::kCosine;
  if (name == "linear") return ScheduleType::kLinear;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown noise schedule '", name, "' (expected 'cosine' or 'linear')"));
}

absl::StatusOr<NoiseSchedule> NoiseSchedule::Create(ScheduleType type,
                                                    int num_timesteps) {
  if (num_timesteps < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "noise schedule needs at least 2 timesteps, got ", num_timesteps));
  }
  std::vector<double> betas = type == ScheduleType::kCosine
                                  ? CosineBetas(num_timesteps)
                                  : LinearBetas(num_timesteps);
  return NoiseSchedule(type, std::move(betas));
}

NoiseSchedule::NoiseSchedule(ScheduleType type, std::vector<double> betas)
    : type_(type), betas_(std::move(betas)), alpha_bars_(betas_.size()) {
  double product = 1.0;
  for (size_t t = 0; t < betas_.size(); ++t) {
    product *= 1.0 - betas_[t];
    alpha_bars_[t] = product;
  }
}

double NoiseSchedule::Beta(int t) const { return betas_.at(t); }
double NoiseSchedule::AlphaBar(int t) const { return alpha_bars_.at(t); }
double NoiseSchedule::SignalScale(int t) const {
  return std::sqrt(alpha_bars_.at(t));
}
double NoiseSchedule::NoiseScale(int t) const {
  return std::sqrt(1.0 - alpha_bars_.at(t));
}

absl::Status NoiseSchedule::AddNoise(absl::Span<const float> x,
                                     absl::Span<const float> eps, int t,
                                     absl::Span<float> x_t) const {
  if (t < 0 || t >= num_timesteps()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "timestep ", t, " out of range [0, ", num_timesteps(), ")"));
  }
  if (eps.size() != x.size() || x_t.size() != x.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AddNoise: sizes differ (x ", x.size(), ", eps ",
                     eps.size(), ", x_t ", x_t.size(), ")"));
  }
  const double signal = SignalScale(t);
  const double noise = NoiseScale(t);
  for (size_t i = 0; i < x.size(); ++i) {
    x_t[i] = static_cast<float>(signal * x[i] + noise * eps[i]);
  }
  return absl::OkStatus();
}

}  // namespace retrace::model

#include "server/model/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

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

std::vector<double> LinearBetas(int num_timesteps, double beta_start,
                                double beta_end) {
  std::vector<double> betas(num_timesteps);
  const double span = beta_end - beta_start;
  for (int t = 0; t < num_timesteps; ++t) {
    betas[t] = beta_start + span * static_cast<double>(t) / (num_timesteps - 1);
  }
  return betas;
}

absl::Status CheckLength(size_t size, absl::string_view what) {
  if (size < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "noise schedule ", what, " needs at least 2 values, got ", size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view ScheduleTypeName(ScheduleType type) {
  switch (type) {
    case ScheduleType::kCosine:
      return "cosine";
    case ScheduleType::kLinear:
      return "linear";
    case ScheduleType::kBetas:
      return "betas";
    case ScheduleType::kAlphaBars:
      return "alpha_bars";
  }
  return "unknown";
}

absl::StatusOr<ScheduleType> ParseScheduleType(absl::string_view name) {
  if (name == "cosine") return ScheduleType::kCosine;
  if (name == "linear") return ScheduleType::kLinear;
  if (name == "betas") return ScheduleType::kBetas;
  if (name == "alpha_bars") return ScheduleType::kAlphaBars;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown noise schedule '", name,
                   "' (expected 'cosine', 'linear', 'betas' or 'alpha_bars')"));
}

absl::StatusOr<NoiseSchedule> NoiseSchedule::Create(ScheduleType type,
                                                    int num_timesteps) {
  if (num_timesteps < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "noise schedule needs at least 2 timesteps, got ", num_timesteps));
  }
  switch (type) {
    case ScheduleType::kCosine:
      return NoiseSchedule(type, CosineBetas(num_timesteps));
    case ScheduleType::kLinear:
      return NoiseSchedule(type, LinearBetas(num_timesteps, kLinearBetaStart,
                                             kLinearBetaEnd));
    case ScheduleType::kBetas:
    case ScheduleType::kAlphaBars:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("noise schedule '", ScheduleTypeName(type),
                   "' needs its list of values"));
}

absl::StatusOr<NoiseSchedule> NoiseSchedule::CreateLinear(int num_timesteps,
                                                          double beta_start,
                                                          double beta_end) {
  if (num_timesteps < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "noise schedule needs at least 2 timesteps, got ", num_timesteps));
  }
  if (!(beta_start > 0 && beta_start <= beta_end && beta_end < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("linear noise schedule needs 0 < beta_start <= beta_end "
                     "< 1, got beta_start ",
                     beta_start, ", beta_end ", beta_end));
  }
  return NoiseSchedule(ScheduleType::kLinear,
                       LinearBetas(num_timesteps, beta_start, beta_end));
}

absl::StatusOr<NoiseSchedule> NoiseSchedule::FromBetas(
    std::vector<double> betas) {
  RETURN_IF_ERROR(CheckLength(betas.size(), "'betas'"));
  for (size_t t = 0; t < betas.size(); ++t) {
    if (!(std::isfinite(betas[t]) && betas[t] > 0 && betas[t] < 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("noise schedule 'betas': value ", t, " is ", betas[t],
                       ", must lie in (0, 1)"));
    }
  }
  return NoiseSchedule(ScheduleType::kBetas, std::move(betas));
}

absl::StatusOr<NoiseSchedule> NoiseSchedule::FromAlphaBars(
    std::vector<double> alpha_bars) {
  RETURN_IF_ERROR(CheckLength(alpha_bars.size(), "'alpha_bars'"));
  std::vector<double> betas(alpha_bars.size());
  double previous = 1.0;
  for (size_t t = 0; t < alpha_bars.size(); ++t) {
    const double a = alpha_bars[t];
    if (!(std::isfinite(a) && a > 0 && a <= 1 && (t == 0 || a < previous))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "noise schedule 'alpha_bars': value ", t, " is ", a,
          ", must lie in (0, 1] and be below the value before it"));
    }
    betas[t] = 1.0 - a / previous;
    previous = a;
  }
  return NoiseSchedule(std::move(betas), std::move(alpha_bars));
}

NoiseSchedule::NoiseSchedule(std::vector<double> betas,
                             std::vector<double> alpha_bars)
    : type_(ScheduleType::kAlphaBars),
      betas_(std::move(betas)),
      alpha_bars_(std::move(alpha_bars)) {}

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

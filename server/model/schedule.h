// Noise schedules of the DDPM forward process, without LibTorch.
//
// A schedule defines β_t and ᾱ_t = Π_{i≤t} (1 − β_i) for t = 0..T-1 and the
// forward noising x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε (docs/featurization.md). Timestep t
// here is the 0-based index of the last noising step applied, so t = 0 is the
// least noisy and t = T-1 the noisiest level.
//
// Schedules:
//   cosine (default): ᾱ(s) = f(s)/f(0) with f(s) = cos²(((s/T +
//   0.008)/1.008)·π/2),
//     β_t = min(1 − f((t+1)/T)/f(t/T), 0.999), then ᾱ_t = Π (1 − β_i). Where no
//     β is clipped, ᾱ_t equals f((t+1)/T)/f(0) exactly up to rounding.
//   linear: β_t evenly spaced from β_start (t = 0) to β_end (t = T-1),
//     by default 1e-4 and 0.02.
//   betas: an explicit list β_0..β_{T-1} (each in (0, 1)).
//   alpha_bars: an explicit list ᾱ_0..ᾱ_{T-1}, strictly decreasing in (0, 1);
//     β_t = 1 − ᾱ_t/ᾱ_{t−1} (β_0 = 1 − ᾱ_0), and AlphaBar returns the given
//     values themselves.
//
// Values are computed once in double precision. NoiseSchedule is an immutable
// value type: copyable and safe to share between threads.
#ifndef RETRACE_SERVER_MODEL_SCHEDULE_H_
#define RETRACE_SERVER_MODEL_SCHEDULE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace retrace::model {

enum class ScheduleType { kCosine, kLinear, kBetas, kAlphaBars };

// "cosine", "linear", "betas" or "alpha_bars" (the names the store manifest
// and model descriptions record).
absl::string_view ScheduleTypeName(ScheduleType type);
// Inverse of ScheduleTypeName; INVALID_ARGUMENT names the accepted values.
absl::StatusOr<ScheduleType> ParseScheduleType(absl::string_view name);

class NoiseSchedule {
 public:
  static constexpr int kDefaultNumTimesteps = 1000;
  static constexpr double kCosineOffset = 0.008;
  static constexpr double kCosineMaxBeta = 0.999;
  static constexpr double kLinearBetaStart = 1e-4;
  static constexpr double kLinearBetaEnd = 0.02;

  // INVALID_ARGUMENT when num_timesteps < 2 or `type` is an explicit list
  // (kBetas, kAlphaBars: use FromBetas / FromAlphaBars).
  static absl::StatusOr<NoiseSchedule> Create(
      ScheduleType type = ScheduleType::kCosine,
      int num_timesteps = kDefaultNumTimesteps);
  // Linear with other endpoints; INVALID_ARGUMENT unless
  // 0 < beta_start <= beta_end < 1 and num_timesteps >= 2.
  static absl::StatusOr<NoiseSchedule> CreateLinear(int num_timesteps,
                                                    double beta_start,
                                                    double beta_end);
  // Explicit lists (at least 2 values). INVALID_ARGUMENT naming the first bad
  // index: a β outside (0, 1), an ᾱ outside (0, 1] or not strictly
  // decreasing, a non-finite value.
  static absl::StatusOr<NoiseSchedule> FromBetas(std::vector<double> betas);
  static absl::StatusOr<NoiseSchedule> FromAlphaBars(
      std::vector<double> alpha_bars);

  ScheduleType type() const { return type_; }
  int num_timesteps() const { return static_cast<int>(betas_.size()); }

  // Accessors take t in [0, T); out-of-range t is a caller bug (checked with
  // an assert-style abort, as for std::vector::at).
  double Beta(int t) const;
  double AlphaBar(int t) const;
  // √ᾱ_t and √(1−ᾱ_t): the coefficients of x and ε in x_t.
  double SignalScale(int t) const;
  double NoiseScale(int t) const;

  const std::vector<double>& betas() const { return betas_; }
  const std::vector<double>& alpha_bars() const { return alpha_bars_; }

  // x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε on host buffers of equal size (computed in
  // double, stored as float). INVALID_ARGUMENT on size mismatch or bad t.
  absl::Status AddNoise(absl::Span<const float> x, absl::Span<const float> eps,
                        int t, absl::Span<float> x_t) const;

 private:
  NoiseSchedule(ScheduleType type, std::vector<double> betas);
  NoiseSchedule(std::vector<double> betas, std::vector<double> alpha_bars);

  ScheduleType type_;
  std::vector<double> betas_;
  std::vector<double> alpha_bars_;
};

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_SCHEDULE_H_

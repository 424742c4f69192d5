// The per-example diffusion loss, without LibTorch:
//   ℓ = mean_i |ε_i − ε̂_i|^p,  p = 2 ("mse", default) or p = 1 ("l1").
// The LibTorch version used for training and gradients is in diffusion.h; this
// header holds the names the store manifest records and a double-precision
// host reference.
#ifndef RETRACE_SERVER_MODEL_LOSS_H_
#define RETRACE_SERVER_MODEL_LOSS_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace retrace::model {

enum class LossType { kMse, kL1 };

// "mse" or "l1".
absl::string_view LossTypeName(LossType type);
// Inverse of LossTypeName; INVALID_ARGUMENT names the accepted values.
absl::StatusOr<LossType> ParseLossType(absl::string_view name);
// The exponent p: 2 for kMse, 1 for kL1.
int LossPower(LossType type);

// mean_i |eps_i − eps_hat_i|^p accumulated in double. INVALID_ARGUMENT when the
// sizes differ or are zero.
absl::StatusOr<double> PerExampleLossReference(absl::Span<const float> eps,
                                               absl::Span<const float> eps_hat,
                                               LossType type);

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_LOSS_H_

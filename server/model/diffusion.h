// LibTorch forms of the diffusion training objective (docs/featurization.md):
//   x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε,   ℓ(θ; x, t, ε) = mean |ε − ε_θ(x_t, t)|^p.
// All functions validate their inputs and return errors instead of throwing.
// Results stay on the autograd graph of their inputs.
#ifndef RETRACE_SERVER_MODEL_DIFFUSION_H_
#define RETRACE_SERVER_MODEL_DIFFUSION_H_

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "server/model/diffusion_model.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"

namespace retrace::model {

// The [T] float32 tensor of ᾱ_t (computed in double, rounded once).
at::Tensor AlphaBarTensor(const NoiseSchedule& schedule);

// x: float [B, ...]; t: int64 [B] in [0, T); eps: same shape as x. Returns x_t,
// same shape as x. INVALID_ARGUMENT for mismatched shapes, wrong dtypes or t
// out of range.
absl::StatusOr<at::Tensor> AddNoise(const NoiseSchedule& schedule,
                                    const at::Tensor& x, const at::Tensor& t,
                                    const at::Tensor& eps);

// eps, eps_hat: float [B, ...] of equal shape. Returns the per-example loss
// mean over all but the first dimension of |eps − eps_hat|^p, float [B].
absl::StatusOr<at::Tensor> PerExampleLoss(const at::Tensor& eps,
                                          const at::Tensor& eps_hat,
                                          LossType loss);

// Noises x with (t, eps), runs the model and returns the per-example loss [B].
absl::StatusOr<at::Tensor> DiffusionLoss(DiffusionModel& model,
                                         const NoiseSchedule& schedule,
                                         LossType loss, const at::Tensor& x,
                                         const at::Tensor& t,
                                         const at::Tensor& eps);

}  // namespace retrace::model

#endif  // RETRACE_SERVER_MODEL_DIFFUSION_H_

// Internal to retrace_featurize (tests use it as the reference): gradients of
// the diffusion loss for groups of rows, computed either in one batched pass
// or one backward pass per group.
//
// Rows r = 0..N−1 carry (x_r, t_r, ε_r); consecutive rows form groups of
// `group_size` k (N divisible by k). For group g the engine returns
//   G_g = (1/k) Σ_{r in g} ∇_θ ℓ(θ; x_r, t_r, ε_r)
// restricted to the selected parameters: one float32 tensor [N/k, numel] per
// selected parameter, in the model's NamedParameters order. With k = 1 these
// are per-sample gradients; the training side uses k = grad_timesteps and the
// query side k = query_noise_draws.
//
// Engines:
//   kLoop: one forward + backward per group through DiffusionModel::Forward
//     (any model, TorchScript included). The reference in tests.
//   kLayerwise: one forward + backward for all N rows through UNetMirror;
//     per-row gradients of each Linear / Conv2d / GroupNorm layer follow from
//     its recorded input and the gradient of the loss at its output:
//       Linear:    dW_g = Σ_r go_r ⊗ in_r,           db_g = Σ_r go_r
//       Conv2d:    dW_g = Σ_r go_r · unfold(in_r)ᵀ,   db_g = Σ_r Σ_pos go_r
//       GroupNorm: dγ_g = Σ_r Σ_pos go_r ⊙ x̂_r,      dβ_g = Σ_r Σ_pos go_r
//     (go already carries the 1/k weight). The Conv2d sums are evaluated as
//     the weight gradient of one grouped convolution with N/k groups (one
//     oneDNN call per layer, as fast as the ordinary summed weight gradient;
//     unfold + bmm was about ten times slower on the CPU). Only the built-in
//     UNet.
//
// Memory: the result holds (N/k)·p_selected floats; kLayerwise additionally
// keeps the activations of one batched forward pass (and, for k > 1, a
// regrouped copy of one layer's input and output gradient at a time).
//
// Thread safety: not thread-safe (one Compute at a time); the model must not
// be mutated (Load, SetTraining) while Compute runs. Compute uses LibTorch's
// intra-op thread pool.
#ifndef RETRACE_SERVER_FEATURIZE_GROUP_GRADIENTS_H_
#define RETRACE_SERVER_FEATURIZE_GROUP_GRADIENTS_H_

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/diffusion_model.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"

namespace retrace::featurize {

enum class GradientMethod {
  kAuto,       // kLayerwise when the model supports it, else kLoop
  kLayerwise,  // refuse (FAILED_PRECONDITION) models it does not support
  kLoop,
};

// "auto", "layerwise", "loop".
const char* GradientMethodName(GradientMethod method);

namespace internal {

class GroupGradientEngine {
 public:
  virtual ~GroupGradientEngine() = default;

  // x, eps: float32 [N, C, H, W] (clean images in [-1, 1] and noise); t:
  // int64 [N] in [0, T). INVALID_ARGUMENT for bad shapes or N % k != 0.
  virtual absl::StatusOr<std::vector<at::Tensor>> Compute(
      const at::Tensor& x, const at::Tensor& t, const at::Tensor& eps,
      int64_t group_size) = 0;

  // kLoop or kLayerwise.
  virtual GradientMethod method() const = 0;
};

// `selected`: indices into model->NamedParameters(), increasing. The model
// must outlive the engine. For kLayerwise (and kAuto on a UNetModel) the
// mirror's output is checked against model->Forward on a small fixed input;
// a mismatch is FAILED_PRECONDITION for kLayerwise and a fallback to kLoop
// for kAuto.
absl::StatusOr<std::unique_ptr<GroupGradientEngine>> CreateGroupGradientEngine(
    model::DiffusionModel* model, const model::NoiseSchedule& schedule,
    model::LossType loss, std::vector<int> selected, GradientMethod method);

}  // namespace internal
}  // namespace retrace::featurize

#endif  // RETRACE_SERVER_FEATURIZE_GROUP_GRADIENTS_H_

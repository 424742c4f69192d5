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
//   kParallel: the loop's per-group forward + backward, split over W worker
//     threads (any model that offers DiffusionModel::Clone: TorchScript).
//     Worker w owns a replica of the model made at creation and computes a
//     contiguous share of the groups (shares differ by at most one group;
//     min(W, groups) workers take part). Each Compute first copies the
//     original's parameters into every replica (a memcpy of p values per
//     worker), so a Load into the original between calls is picked up.
//     The per-group arithmetic is the loop's, each worker on one intra-op
//     thread, so the result equals the loop's bit for bit when the loop also
//     runs on one intra-op thread (and to float rounding otherwise).
//
//     Threads. Debian's LibTorch uses OpenMP for its intra-op parallelism:
//     at::set_num_threads calls omp_set_num_threads, which sets the calling
//     thread's own OpenMP thread count, but also a process-wide default that
//     each thread adopts at its first parallel region, the thread count of
//     the pthreadpool, and clears oneDNN's primitive cache; calling it from
//     a worker would therefore change other threads. Each worker instead
//     calls omp_set_num_threads(1) for itself (after LibTorch's lazy
//     per-thread initialisation), so ATen and oneDNN (also OpenMP) run
//     inline on it and W workers use W cores. OpenBLAS (the pthreads build)
//     keeps one process-wide thread count and serialises concurrent
//     multi-threaded calls, which made two workers slower than one; while a
//     kParallel Compute runs it is set to 1, and the last Compute to finish
//     restores it (other threads' BLAS calls run single-threaded meanwhile).
//     Per-sample passes of a small model gain nothing from intra-op threads
//     (measured: the loop with 2 threads is no faster than with 1), so one
//     thread per worker and W = cores is the split that parallelises.
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
// Memory: kParallel also holds W replicas of the model's parameters and
// buffers, and W threads that sleep between calls.
//
// Thread safety: not thread-safe (one Compute at a time); the model must not
// be mutated (Load, SetTraining) while Compute runs. kLoop and kLayerwise use
// the calling thread and LibTorch's intra-op pool; kParallel runs on its own
// worker threads while the caller waits. Replicas copy the parameters, not
// the buffers or the training mode, at each Compute: the featurizer's models
// are in evaluation mode and Load changes parameters only.
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

// Devices: every engine computes on the device of the model's parameters
// (inputs on that device, group gradients returned there). kParallel is
// CPU-only; on a GPU kAuto picks kLayerwise, else kLoop.
enum class GradientMethod {
  kAuto,       // kLayerwise when the model supports it, else kParallel when
               // the model has replicas, W > 1 and sits on the CPU, else kLoop
  kLayerwise,  // refuse (FAILED_PRECONDITION) models it does not support
  kLoop,
  kParallel,  // refuse (FAILED_PRECONDITION) models without Clone or on a GPU
};

// "auto", "layerwise", "loop", "parallel".
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

  // kLoop, kLayerwise or kParallel.
  virtual GradientMethod method() const = 0;

  // Threads the engine computes on: W for kParallel, else 1 (the calling
  // thread, with LibTorch's intra-op pool).
  virtual int workers() const { return 1; }
};

// `selected`: indices into model->NamedParameters(), increasing. The model
// must outlive the engine. For kLayerwise (and kAuto on a UNetModel) the
// mirror's output is checked against model->Forward on a small fixed input;
// a mismatch is FAILED_PRECONDITION for kLayerwise and a fallback to kLoop
// for kAuto. `workers` is W for kParallel (and kAuto): 0 means
// std::thread::hardware_concurrency(); negative is INVALID_ARGUMENT.
// kParallel on a model whose Clone fails is FAILED_PRECONDITION; kAuto then
// uses kLoop.
absl::StatusOr<std::unique_ptr<GroupGradientEngine>> CreateGroupGradientEngine(
    model::DiffusionModel* model, const model::NoiseSchedule& schedule,
    model::LossType loss, std::vector<int> selected, GradientMethod method,
    int workers = 0);

}  // namespace internal
}  // namespace retrace::featurize

#endif  // RETRACE_SERVER_FEATURIZE_GROUP_GRADIENTS_H_

// Featurizer: turns images into the projected gradient features that
// attribution scores — the training side (per sample, checkpoint and slot: the
// full-dimensional norm ‖g‖ and the unit projected vector u = P·g/‖g‖) and the
// query side (per checkpoint and bucket: q^raw and q^unit).
// docs/featurization.md gives the definitions, RNG keys, timestep placement
// and tolerances.
//
// Usage (one checkpoint; the caller loads θ_c into the model and loops over
// checkpoints, assembling [C, S, D] itself):
//   ASSIGN_OR_RETURN(auto featurizer,
//                    Featurizer::Create(model, schedule, spec, options));
//   ASSIGN_OR_RETURN(TrainFeatures f,
//                    featurizer->TrainingSide(images, n0, c, &replay));
//   ASSIGN_OR_RETURN(QueryFeatures q, featurizer->QuerySide(image, c, query));
//
// Per-sample gradients come from the layerwise engine for the built-in UNet
// (one batched forward/backward; group_gradients.h) and from one backward
// pass per sample for other models (TorchScript), split over worker threads
// with a replica of the model each (kParallel) when the model can be copied.
// The gradient of the selected parameters is never concatenated into one
// p-vector: its norm is accumulated and it is projected parameter tensor by
// parameter tensor (kernels/projection.h), each sample's rows scaled by 1/‖g‖
// first so that the fixed-point accumulator stays in range for any p.
//
// Devices: the featurizer computes on the device of the model's parameters
// (move the model first: MoveModelTo, server/model/device.h). Images may
// live anywhere; the timestep and noise draws are generated on the host, so
// they are the same bits on every device, and copied to the model's device;
// the per-sample gradients run batched there (layerwise for the built-in
// UNet, the loop's per-group batches otherwise; kParallel is CPU-only) and
// come back to the host, where the norms and the projection run (the CPU
// projector of kernels/projection.h). Outputs are host tensors. On a GPU the
// gradients differ from the CPU's by float rounding only
// (docs/featurization.md, "Devices").
//
// Memory: a pass holds (rows per pass)·p_selected floats of gradients plus
// one batched forward pass of activations (FeaturizeOptions::max_rows bounds
// the rows); QuerySide holds buckets·query_timesteps·p_selected floats.
//
// Thread safety: a Featurizer is not thread-safe (one call at a time). The
// model is borrowed and must outlive it; do not Load or mutate the model
// while a call runs. Between calls the model may Load another checkpoint:
// the layerwise engine reads the parameter tensors it was created with, so
// Load must update them in place (UNetModel::Load does); the parallel engine
// copies the model's parameters into its replicas at every call. LibTorch's
// intra-op pool (at::set_num_threads), FeaturizeOptions::gradient_workers
// (kParallel) and RETRACE_CPU_THREADS (the projection) decide the
// parallelism. Determinism: the same inputs, seeds, options and thread
// counts give bit-identical outputs.
#ifndef RETRACE_SERVER_FEATURIZE_FEATURIZER_H_
#define RETRACE_SERVER_FEATURIZE_FEATURIZER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/projection.h"
#include "server/featurize/group_gradients.h"
#include "server/model/diffusion_model.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"

namespace retrace::featurize {

inline constexpr int64_t kDefaultNumBuckets = 10;

struct FeaturizeSpec {
  // B + 1 edges 0 = e_0 < ... < e_B = T (bucket b is [e_b, e_{b+1})). Empty:
  // kDefaultNumBuckets equal buckets, e_b = floor(b·T/B).
  std::vector<int64_t> bucket_edges;
  // m: gradients averaged per (sample, checkpoint, bucket).
  int64_t grad_timesteps = 1;
  uint64_t store_seed = 0;
  // output_dim, type, sparsity, seed. input_dim: 0 (filled in with p after
  // the regex) or exactly that p.
  kernels::ProjectionSpec projection;
  // ECMAScript regular expression that a parameter name must match in full
  // (std::regex_match); "" selects every trainable parameter.
  std::string param_regex;
  model::LossType loss = model::LossType::kMse;
};

struct FeaturizeOptions {
  // Rows (sample × draw) per batched forward/backward pass; bounds memory.
  int64_t max_rows = 64;
  GradientMethod method = GradientMethod::kAuto;
  // W, the worker threads of kParallel (which kAuto picks for models that
  // the layerwise engine does not support but that have replicas, i.e.
  // TorchScript models, when W > 1); 0 = std::thread::hardware_concurrency().
  // Each worker holds a replica of the model. A caller that already runs
  // several featurizers at once should divide the cores among them.
  int gradient_workers = 0;
};

// The logged training draw of each sample (the replay slot), as regenerated
// from the training run's keys.
struct ReplayDraws {
  at::Tensor timesteps;  // int64 [B], in [0, T)
  at::Tensor noise;      // float32 [B, C, H, W]
};

struct TrainFeatures {
  // S = buckets (+ 1 replay slot, last, when replay draws were given).
  at::Tensor unit;   // float32 [B, S, D]: P·g/‖g‖ (zero rows when g = 0)
  at::Tensor norms;  // float32 [B, S]: ‖g‖ over the selected parameters
  at::Tensor timesteps;  // int64 [B, buckets, m]: the t_j drawn
};

struct QueryOptions {
  int64_t query_timesteps = 2;  // k timesteps per bucket, 1..65535
  int64_t noise_draws = 4;      // r draws per timestep, 1..2^24−1
  uint64_t seed = 0;            // the request's seed
};

struct QueryFeatures {
  at::Tensor raw;        // float32 [buckets, D]: P·mean_s ḡ(s)
  at::Tensor unit;       // float32 [buckets, D]: P·mean_s ḡ(s)/‖ḡ(s)‖
  at::Tensor timesteps;  // int64 [buckets, k]: the s used
  double project_seconds = 0;  // of the call's time, the projection's
};

class Featurizer {
 public:
  // INVALID_ARGUMENT for bad edges, m < 1, a bad projection spec, a regex
  // that does not compile or selects nothing, or input_dim ≠ p selected;
  // FAILED_PRECONDITION when options.method is kLayerwise and the model does
  // not support it. Puts the model in evaluation mode.
  static absl::StatusOr<std::unique_ptr<Featurizer>> Create(
      model::DiffusionModel* model, const model::NoiseSchedule& schedule,
      FeaturizeSpec spec, FeaturizeOptions options = {});
  ~Featurizer();

  // Training side for samples n0..n0+B−1 at checkpoint c (the model holds
  // θ_c). images: float32 [B, C, H, W] in [−1, 1]. replay: nullptr, or the
  // draws of these B samples. INVALID_ARGUMENT for bad shapes, indices
  // (n0 + B ≤ 2^32, c < 2^16) or non-finite gradients.
  absl::StatusOr<TrainFeatures> TrainingSide(
      const at::Tensor& images, int64_t first_index, int64_t checkpoint,
      const ReplayDraws* replay = nullptr);

  // Query side for one image (float32 [C, H, W] or [1, C, H, W]) at
  // checkpoint c. INVALID_ARGUMENT for bad shapes or options.
  absl::StatusOr<QueryFeatures> QuerySide(const at::Tensor& image,
                                          int64_t checkpoint,
                                          const QueryOptions& options);

  // p: the number of selected parameter coordinates.
  int64_t input_dim() const { return spec_.projection.input_dim; }
  int64_t num_buckets() const {
    return static_cast<int64_t>(spec_.bucket_edges.size()) - 1;
  }
  // The spec with defaults filled in (edges, input_dim).
  const FeaturizeSpec& spec() const { return spec_; }
  // Names of the selected parameters, in projection order.
  const std::vector<std::string>& selected_parameters() const {
    return selected_names_;
  }
  // The per-sample gradient method in use (kLayerwise, kLoop or kParallel).
  GradientMethod method() const;
  // Threads the per-sample gradients run on (W for kParallel, else 1).
  int gradient_workers() const;

 private:
  struct Projected;
  Featurizer(model::DiffusionModel* model, const model::NoiseSchedule& schedule,
             FeaturizeSpec spec, FeaturizeOptions options);

  // ‖G_g‖ and P·G_g/‖G_g‖ of each group gradient G_g (rows of `pieces`).
  absl::StatusOr<Projected> ProjectUnit(const std::vector<at::Tensor>& pieces);

  model::DiffusionModel* model_;
  model::NoiseSchedule schedule_;
  FeaturizeSpec spec_;
  FeaturizeOptions options_;
  std::vector<std::string> selected_names_;
  std::unique_ptr<internal::GroupGradientEngine> engine_;
};

}  // namespace retrace::featurize

#endif  // RETRACE_SERVER_FEATURIZE_FEATURIZER_H_

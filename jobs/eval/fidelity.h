// Part (e) of `retrace-batch eval`: projection fidelity. How well do the
// scores a store of dimension D serves rank training samples, compared with
// the full-dimensional formulas they approximate (docs/evaluation.md,
// "Projection fidelity")?
//
//   FidelityOptions options;  // D = 256..4096, the first 64 samples
//   ASSIGN_OR_RETURN(FidelityResult r,
//                    MeasureProjectionFidelity(description, manifest,
//                                              train_images, queries,
//                                              options));
//   for (const FidelityRow& row : r.rows) ...  // dims × {tracin, retrac}
//
// Matched pairing over every checkpoint c (weights w_c from the manifest) and
// every bucket b; the replay slot is not used. For training sample n and a
// query x′ (docs/scoring.md, docs/featurization.md):
//   reference  TracIn(n) = Σ_c w_c Σ_b ⟨g_{n,c,b}, mean_s ḡ_{c,b}(s)⟩
//              ReTrac(n) = Σ_c w_c Σ_b ⟨g/‖g‖, mean_s ḡ(s)/‖ḡ(s)‖⟩
//     from the actual per-sample gradients over the parameters that the
//     store's param_regex selects, with the training draws (t_j, ε_j) of the
//     store seed and the query timesteps and noise of the request seed, dot
//     products and norms in double;
//   projected  TracIn(n) = Σ_c w_c Σ_b ‖g‖·⟨u, q_raw_b⟩,
//              ReTrac(n) = Σ_c w_c Σ_b ⟨u, q_unit_b⟩
//     from a featurize::Featurizer with the store's spec at output dimension
//     D (the features the store build and retraced compute), the unit
//     vectors u rounded to the store's dtype as the store holds them, the
//     terms summed in double.
// Per query and method: the Spearman correlation of the two score vectors
// over the n samples and the top-k recall (|top-k reference ∩ top-k
// projected| / k, ties by the lower index), then their mean and minimum over
// the queries (metrics.h; queries whose value is undefined, NaN, are left out
// of both, and a row whose every query is undefined reports NaN).
//
// Self-checks (they prove that the reference uses the store's draws):
// max_norm_rel_error compares the reference's ‖g_{n,c,b}‖ with the
// featurizer's norms at every D; max_query_rel_error compares P·(reference
// query vectors), P rebuilt with the Projector of kernels/projection.h, with
// the featurizer's q_raw and q_unit. Both differ only by float summation
// order (below 1e-6 on the built-in UNet); a different draw or parameter
// set shows as errors of order 1.
//
// Cost: per checkpoint, the reference computes n·B·m training gradients and
// Q·B·k·r query gradients once, and each D repeats both inside its
// featurizer. Memory: n·p fp32 gradient values of one bucket at a time plus
// one pass of query gradients (p: selected parameters), and the n scores of
// every query.
//
// Errors: INVALID_ARGUMENT for empty or invalid dims (the featurizer's
// message, naming D), train_samples or top_k < 1, top_k above the samples
// used, query_timesteps outside [1, 65535] or noise_draws outside
// [1, 2^24), images of the wrong dtype or shape, no queries, a manifest whose
// checkpoint count differs from the description's; FAILED_PRECONDITION when
// the description is not the store's model (run::CheckMatchesStore) or the
// manifest has no dataset.store_seed; the errors of loading a checkpoint
// (run::LoadCheckpointModel) and of LibTorch (RESOURCE_EXHAUSTED for out of
// memory).
//
// Not thread-safe: loads models and runs LibTorch on the calling thread and
// its intra-op pool (thread count as set by the caller).
#ifndef RETRACE_JOBS_EVAL_FIDELITY_H_
#define RETRACE_JOBS_EVAL_FIDELITY_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/run/model_description.h"
#include "server/store/manifest.h"

namespace retrace::eval {

struct FidelityOptions {
  // Projection dimensions D to measure, each its own featurizer.
  std::vector<int64_t> dims = {256, 512, 1024, 2048, 4096};
  // n: the first train_samples images in store order (all of them when
  // fewer are given).
  int64_t train_samples = 64;
  int64_t top_k = 10;  // 1..n
  // The query request: k timesteps per bucket, r noise draws each, seed.
  int64_t query_timesteps = 2;
  int64_t noise_draws = 4;
  uint64_t request_seed = 0;
};

struct FidelityRow {
  int64_t dim = 0;
  std::string method;  // "tracin" or "retrac"
  // Over the queries: Spearman correlation in [-1, 1], top-k recall in
  // [0, 1].
  double spearman_mean = 0, spearman_min = 0, recall_mean = 0, recall_min = 0;
};

struct FidelityResult {
  int64_t train_samples = 0;  // n used
  int64_t queries = 0;        // Q
  int64_t parameters = 0;     // p selected by the store's param_regex
  // For each D in options.dims order: tracin, then retrac.
  std::vector<FidelityRow> rows;
  // max over D, c, n, b of |featurizer ‖g‖ − reference ‖g‖| / reference ‖g‖
  // (a zero reference norm counts 0 when the featurizer's is 0 too, else
  // infinity).
  double max_norm_rel_error = 0;
  // max over D, c, query, b and {raw, unit} of ‖featurizer q − P·reference
  // q‖ / ‖featurizer q‖ (0 when both are 0).
  double max_query_rel_error = 0;
  double seconds = 0;  // wall time of the whole measurement
};

// description: the model description the store was built from (already
// loaded, checkpoint hashes filled in); manifest: the store's manifest (bucket
// edges, m, store seed, loss, param_regex, projection type, sparsity and
// seed, dtype, w_c; its projection.dim is not used). train_images: float32
// [N, C, H, W] in the model's pixel range, in store order; queries: float32
// [Q, C, H, W], same range. Both are read, not kept. See the file comment.
absl::StatusOr<FidelityResult> MeasureProjectionFidelity(
    const run::ModelDescription& description, const store::Manifest& manifest,
    const at::Tensor& train_images, const at::Tensor& queries,
    const FidelityOptions& options);

}  // namespace retrace::eval

#endif  // RETRACE_JOBS_EVAL_FIDELITY_H_

#include "jobs/eval/fidelity.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "jobs/eval/metrics.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "common/status.h"
#include "server/core/kernel_status.h"
#include "server/featurize/featurizer.h"
#include "server/featurize/group_gradients.h"
#include "server/featurize/timesteps.h"
#include "server/model/counter_rng.h"
#include "server/model/torch_status.h"

// The reference re-derives every draw from the public functions of
// timesteps.h and counter_rng.h instead of asking the featurizer for them:
// the featurizer's norms and query vectors then check the reference (and the
// draws) rather than being copied into it. Gradients come from the
// featurizer's own per-sample engine, so the two sides differ only in float
// summation order.

namespace retrace::eval {
namespace {

using model::internal::CallTorch;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInfinity = std::numeric_limits<double>::infinity();

absl::Status CheckImages(const at::Tensor& images, const model::ImageShape& s,
                         absl::string_view what) {
  if (!images.defined() || images.dim() != 4 ||
      images.scalar_type() != at::kFloat || images.size(0) < 1 ||
      images.size(1) != s.channels || images.size(2) != s.height ||
      images.size(3) != s.width) {
    return absl::InvalidArgumentError(
        absl::StrCat("projection fidelity: ", what, " must be float32 [>= 1, ",
                     s.channels, ", ", s.height, ", ", s.width, "]"));
  }
  return absl::OkStatus();
}

// Σ over pieces of the squared row norms, in double: [rows].
at::Tensor SquaredRowNorms(const std::vector<at::Tensor>& pieces) {
  at::Tensor sum = at::zeros({pieces.front().size(0)}, at::kDouble);
  for (const at::Tensor& piece : pieces) {
    sum += piece.to(at::kDouble).square().sum(1);
  }
  return sum;
}

// 1/norm, and 0 for a zero norm (a zero gradient has no direction).
at::Tensor InverseOrZero(const at::Tensor& norms) {
  return at::where(norms > 0, 1.0 / norms, at::zeros_like(norms));
}

// P·rows for double rows [rows, numel_i] (one tensor per selected parameter,
// in projection order), as float32 [rows, D]. Each row is handed to the
// projector with unit norm, as the featurizer does, so that the fixed-point
// accumulator stays in range; the norm is multiplied back in double.
absl::StatusOr<at::Tensor> Project(const kernels::ProjectionSpec& spec,
                                   const std::vector<at::Tensor>& rows) {
  const at::Tensor norms = SquaredRowNorms(rows).sqrt();
  const at::Tensor inverse = InverseOrZero(norms).unsqueeze(1);
  std::unique_ptr<kernels::Projector> projector;
  RETURN_IF_KERNEL_ERROR(kernels::Projector::Create(
      spec, norms.size(0), kernels::Backend::kCpu, nullptr, &projector));
  int64_t offset = 0;
  for (const at::Tensor& piece : rows) {
    const at::Tensor scaled = (piece * inverse).to(at::kFloat).contiguous();
    const int64_t len = scaled.size(1);
    RETURN_IF_KERNEL_ERROR(
        projector->Accumulate(scaled.data_ptr<float>(), len, len, offset, 1.0));
    offset += len;
  }
  at::Tensor out = at::empty({norms.size(0), spec.output_dim}, at::kFloat);
  RETURN_IF_KERNEL_ERROR(projector->Finalize(out.data_ptr<float>()));
  return (out.to(at::kDouble) * norms.unsqueeze(1)).to(at::kFloat);
}

// The unit vectors as the store holds them: rounded to its dtype and back.
at::Tensor AsStored(const at::Tensor& unit, kernels::DType dtype) {
  at::Tensor out = unit.contiguous().clone();
  float* data = out.data_ptr<float>();
  const int64_t count = out.numel();
  switch (dtype) {
    case kernels::DType::kF32:
      break;
    case kernels::DType::kF16:
      for (int64_t i = 0; i < count; ++i) {
        data[i] = kernels::HalfToFloat(kernels::FloatToHalf(data[i]));
      }
      break;
    case kernels::DType::kBF16:
      for (int64_t i = 0; i < count; ++i) {
        data[i] = kernels::Bf16ToFloat(kernels::FloatToBf16(data[i]));
      }
      break;
  }
  return out;
}

// max of diff / scale elementwise, where 0/0 counts 0 and x/0 infinity.
double MaxRelative(const at::Tensor& diff, const at::Tensor& scale) {
  if (diff.numel() == 0) return 0.0;
  const at::Tensor zero_scale =
      at::where(diff > 0, at::full_like(diff, kInfinity), at::zeros_like(diff));
  return at::where(scale > 0, diff / scale, zero_scale).max().item<double>();
}

// max over rows of ‖got − want‖ / ‖got‖. got, want: [..., D].
double MaxRowRelError(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble);
  return MaxRelative(
      at::linalg_vector_norm(g - want.to(at::kDouble), 2, at::IntArrayRef{-1}),
      at::linalg_vector_norm(g, 2, at::IntArrayRef{-1}));
}

// max of |got − want| / want elementwise.
double MaxNormRelError(const at::Tensor& got, const at::Tensor& want) {
  return MaxRelative((got.to(at::kDouble) - want).abs(), want);
}

// What the featurizer at one D gives for one checkpoint.
struct ProjectedFeatures {
  at::Tensor norms;       // float32 [n, B]
  at::Tensor query_raw;   // float32 [Q, B, D]
  at::Tensor query_unit;  // float32 [Q, B, D]
};

// The full-dimensional reference for one checkpoint.
struct Reference {
  at::Tensor norms;  // double [n, B]: ‖g_{n,c,b}‖
  // Σ_b ⟨g, mean_s ḡ⟩ and Σ_b ⟨g/‖g‖, mean_s ḡ/‖ḡ‖⟩: double [Q, n].
  at::Tensor tracin, retrac;
  // Per D: P·mean_s ḡ and P·mean_s ḡ/‖ḡ‖ with the featurizer's P at that D:
  // float32 [Q, B, D].
  std::vector<at::Tensor> query_raw, query_unit;
};

struct Setup {
  featurize::FeaturizeSpec spec;  // D left to the caller
  std::vector<int64_t> dims;
  int64_t query_timesteps = 0;
  int64_t noise_draws = 0;
  uint64_t request_seed = 0;
  int64_t rows_per_pass = 0;
};

// The featurizer at one D for checkpoint c: training-side norms and
// unit vectors, the query-side vectors of every query; adds w_c times the
// projected scores to *tracin and *retrac ([Q, n] double).
absl::StatusOr<ProjectedFeatures> RunFeaturizer(
    const Setup& setup, featurize::Featurizer* featurizer,
    const at::Tensor& train, const at::Tensor& queries, int64_t checkpoint,
    double weight, kernels::DType dtype, at::Tensor* tracin,
    at::Tensor* retrac) {
  ASSIGN_OR_RETURN(featurize::TrainFeatures t,
                   featurizer->TrainingSide(train, 0, checkpoint));
  featurize::QueryOptions query;
  query.query_timesteps = setup.query_timesteps;
  query.noise_draws = setup.noise_draws;
  query.seed = setup.request_seed;
  std::vector<at::Tensor> raw, unit;
  for (int64_t q = 0; q < queries.size(0); ++q) {
    ASSIGN_OR_RETURN(featurize::QueryFeatures f,
                     featurizer->QuerySide(queries[q], checkpoint, query));
    raw.push_back(f.raw);
    unit.push_back(f.unit);
  }
  ProjectedFeatures out;
  out.norms = t.norms;
  out.query_raw = at::stack(raw);
  out.query_unit = at::stack(unit);
  // Scores as retraced computes them from the store's rows: one term per
  // slot, summed over the buckets in double. (The scan's dot products are
  // fp32; here they are double, a difference of float rounding only.)
  const at::Tensor u = AsStored(t.unit, dtype).to(at::kDouble);  // [n, B, D]
  const at::Tensor dots_raw =
      at::einsum("nbd,qbd->qnb", {u, out.query_raw.to(at::kDouble)});
  const at::Tensor dots_unit =
      at::einsum("nbd,qbd->qnb", {u, out.query_unit.to(at::kDouble)});
  *tracin += weight * (dots_raw * t.norms.to(at::kDouble).unsqueeze(0)).sum(2);
  *retrac += weight * dots_unit.sum(2);
  return out;
}

// The reference for checkpoint c from per-sample gradients of `engine`,
// with the draws re-derived from the keys of docs/featurization.md.
absl::StatusOr<Reference> ComputeReference(
    const Setup& setup, featurize::internal::GroupGradientEngine* engine,
    const model::ImageShape& shape, const at::Tensor& train,
    const at::Tensor& queries, int64_t checkpoint) {
  const featurize::FeaturizeSpec& spec = setup.spec;
  const std::vector<int64_t>& edges = spec.bucket_edges;
  const int64_t buckets = static_cast<int64_t>(edges.size()) - 1;
  const int64_t n = train.size(0);
  const int64_t num_queries = queries.size(0);
  const int64_t m = spec.grad_timesteps;
  const int64_t k = setup.query_timesteps;
  const int64_t r_count = setup.noise_draws;
  const int64_t image_numel = shape.channels * shape.height * shape.width;

  Reference ref;
  ref.norms = at::zeros({n, buckets}, at::kDouble);
  ref.tracin = at::zeros({num_queries, n}, at::kDouble);
  ref.retrac = at::zeros({num_queries, n}, at::kDouble);
  for (size_t d = 0; d < setup.dims.size(); ++d) {
    ref.query_raw.push_back(
        at::zeros({num_queries, buckets, setup.dims[d]}, at::kFloat));
    ref.query_unit.push_back(
        at::zeros({num_queries, buckets, setup.dims[d]}, at::kFloat));
  }

  for (int64_t b = 0; b < buckets; ++b) {
    // Training side: g_{n,c,b} = (1/m) Σ_j ∇ℓ(x_n, t_j, ε_j), [n, numel_i].
    std::vector<at::Tensor> g;
    const int64_t per_pass = std::max<int64_t>(1, setup.rows_per_pass / m);
    for (int64_t s0 = 0; s0 < n; s0 += per_pass) {
      const int64_t count = std::min(per_pass, n - s0);
      at::Tensor t = at::empty({count * m}, at::kLong);
      at::Tensor eps = at::empty(
          {count * m, shape.channels, shape.height, shape.width}, at::kFloat);
      int64_t* t_data = t.data_ptr<int64_t>();
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t row = i * m + j;
          t_data[row] =
              featurize::BuildTimestep(spec.store_seed, s0 + i, checkpoint, b,
                                       j, edges[b], edges[b + 1]);
          model::GaussianFill(
              featurize::BuildKey(model::RngStream::kBuildNoise,
                                  spec.store_seed, s0 + i, checkpoint, b, j),
              eps.data_ptr<float>() + row * image_numel, image_numel);
        }
      }
      const at::Tensor x =
          train.narrow(0, s0, count).repeat_interleave(m, 0).contiguous();
      ASSIGN_OR_RETURN(std::vector<at::Tensor> grads,
                       engine->Compute(x, t, eps, m));
      if (g.empty()) {
        for (const at::Tensor& piece : grads) {
          g.push_back(at::empty({n, piece.size(1)}, at::kFloat));
        }
      }
      for (size_t i = 0; i < grads.size(); ++i) {
        g[i].narrow(0, s0, count).copy_(grads[i]);
      }
    }
    const at::Tensor g_norms = SquaredRowNorms(g).sqrt();  // [n]
    ref.norms.select(1, b).copy_(g_norms);
    const at::Tensor g_inverse = InverseOrZero(g_norms).unsqueeze(0);  // [1, n]

    // Query side: the k timesteps of the bucket, r draws each; the noise
    // depends on (c, b, i, r) only, so every query gets the same ε.
    const std::vector<int64_t> s =
        featurize::QueryTimesteps(edges[b], edges[b + 1], k);
    at::Tensor t_one = at::empty({k * r_count}, at::kLong);
    at::Tensor eps_one = at::empty(
        {k * r_count, shape.channels, shape.height, shape.width}, at::kFloat);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t r = 0; r < r_count; ++r) {
        const int64_t row = i * r_count + r;
        t_one.data_ptr<int64_t>()[row] = s[i];
        model::GaussianFill(
            featurize::QueryNoiseKey(setup.request_seed, checkpoint, b, i, r),
            eps_one.data_ptr<float>() + row * image_numel, image_numel);
      }
    }
    const int64_t per_chunk =
        std::max<int64_t>(1, setup.rows_per_pass / (k * r_count));
    for (int64_t q0 = 0; q0 < num_queries; q0 += per_chunk) {
      const int64_t count = std::min(per_chunk, num_queries - q0);
      const at::Tensor x = queries.narrow(0, q0, count)
                               .repeat_interleave(k * r_count, 0)
                               .contiguous();
      const at::Tensor t = t_one.repeat({count});
      const at::Tensor eps = eps_one.repeat({count, 1, 1, 1});
      // ḡ(s) per (query, i): [count·k, numel_i].
      ASSIGN_OR_RETURN(std::vector<at::Tensor> g_bar,
                       engine->Compute(x, t, eps, r_count));
      const at::Tensor bar_inverse =
          InverseOrZero(SquaredRowNorms(g_bar).sqrt()).reshape({count, k, 1});
      std::vector<at::Tensor> raw, unit;  // double [count, numel_i]
      at::Tensor dot_raw = at::zeros({count, n}, at::kDouble);
      at::Tensor dot_unit = at::zeros({count, n}, at::kDouble);
      for (size_t i = 0; i < g_bar.size(); ++i) {
        const at::Tensor per_s =
            g_bar[i].to(at::kDouble).reshape({count, k, -1});
        raw.push_back(per_s.mean(1));
        unit.push_back((per_s * bar_inverse).mean(1));
        const at::Tensor g_t = g[i].to(at::kDouble).t();
        dot_raw += at::mm(raw.back(), g_t);
        dot_unit += at::mm(unit.back(), g_t);
      }
      ref.tracin.narrow(0, q0, count) += dot_raw;
      ref.retrac.narrow(0, q0, count) += dot_unit * g_inverse;
      for (size_t d = 0; d < setup.dims.size(); ++d) {
        kernels::ProjectionSpec projection = spec.projection;
        projection.output_dim = setup.dims[d];
        ASSIGN_OR_RETURN(at::Tensor p_raw, Project(projection, raw));
        ASSIGN_OR_RETURN(at::Tensor p_unit, Project(projection, unit));
        ref.query_raw[d].narrow(0, q0, count).select(1, b).copy_(p_raw);
        ref.query_unit[d].narrow(0, q0, count).select(1, b).copy_(p_unit);
      }
    }
  }
  return ref;
}

// Per-query Spearman and top-k recall of projected against reference scores
// (both double [Q, n]), summarized over the queries.
FidelityRow Compare(int64_t dim, const char* method,
                    const at::Tensor& reference, const at::Tensor& projected,
                    int64_t top_k) {
  const int64_t num_queries = reference.size(0);
  const int64_t n = reference.size(1);
  const at::Tensor ref = reference.contiguous();
  const at::Tensor est = projected.contiguous();
  std::vector<double> spearman, recall;
  for (int64_t q = 0; q < num_queries; ++q) {
    const absl::Span<const double> a(ref.data_ptr<double>() + q * n, n);
    const absl::Span<const double> b(est.data_ptr<double>() + q * n, n);
    spearman.push_back(Spearman(a, b));
    recall.push_back(TopKRecall(a, b, top_k));
  }
  auto min_defined = [](const std::vector<double>& values) {
    double out = kNaN;
    for (double v : values) {
      if (!std::isnan(v) && (std::isnan(out) || v < out)) out = v;
    }
    return out;
  };
  FidelityRow row;
  row.dim = dim;
  row.method = method;
  row.spearman_mean = Mean(spearman);
  row.spearman_min = min_defined(spearman);
  row.recall_mean = Mean(recall);
  row.recall_min = min_defined(recall);
  return row;
}

}  // namespace

absl::StatusOr<FidelityResult> MeasureProjectionFidelity(
    const run::ModelDescription& description, const store::Manifest& manifest,
    const at::Tensor& train_images, const at::Tensor& queries,
    const FidelityOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  auto invalid = [](auto&&... parts) {
    return absl::InvalidArgumentError(
        absl::StrCat("projection fidelity: ", parts...));
  };
  if (options.dims.empty()) return invalid("no projection dimensions given");
  if (options.train_samples < 1) {
    return invalid("train_samples must be >= 1, got ", options.train_samples);
  }
  if (options.top_k < 1) {
    return invalid("top_k must be >= 1, got ", options.top_k);
  }
  if (options.query_timesteps < 1 ||
      options.query_timesteps >= featurize::kMaxBuckets) {
    return invalid("query_timesteps must be in [1, 65535], got ",
                   options.query_timesteps);
  }
  if (options.noise_draws < 1 ||
      options.noise_draws >= featurize::kMaxDrawIndex) {
    return invalid("noise_draws must be in [1, ", featurize::kMaxDrawIndex - 1,
                   "], got ", options.noise_draws);
  }
  const model::ImageShape shape = description.shape();
  RETURN_IF_ERROR(CheckImages(train_images, shape, "training images"));
  RETURN_IF_ERROR(CheckImages(queries, shape, "queries"));
  const int64_t n = std::min(options.train_samples, train_images.size(0));
  if (options.top_k > n) {
    return invalid("top_k = ", options.top_k, " exceeds the ", n,
                   " training samples used");
  }

  const store::StoreSpec& store_spec = manifest.spec;
  RETURN_IF_ERROR(run::CheckMatchesStore(description, store_spec));
  if (!store_spec.dataset.contains("store_seed") ||
      !store_spec.dataset["store_seed"].is_number_unsigned()) {
    return absl::FailedPreconditionError(
        "projection fidelity: the store's manifest has no dataset.store_seed");
  }
  ASSIGN_OR_RETURN(const model::NoiseSchedule schedule,
                   run::CreateNoiseSchedule(description.schedule));

  // The store's featurize spec, as retraced derives it from the manifest.
  Setup setup;
  setup.spec.bucket_edges = store_spec.buckets.edges;
  setup.spec.grad_timesteps = store_spec.grad_timesteps;
  setup.spec.store_seed = store_spec.dataset["store_seed"].get<uint64_t>();
  setup.spec.projection.type = store_spec.projection.type;
  setup.spec.projection.sparsity =
      static_cast<int>(store_spec.projection.sparsity);
  setup.spec.projection.seed = store_spec.projection.seed;
  setup.spec.projection.input_dim = store_spec.projection.input_dim;
  setup.spec.param_regex = store_spec.projection.param_regex;
  ASSIGN_OR_RETURN(setup.spec.loss, run::LossTypeOf(description));
  setup.dims = options.dims;
  setup.query_timesteps = options.query_timesteps;
  setup.noise_draws = options.noise_draws;
  setup.request_seed = options.request_seed;
  setup.rows_per_pass = featurize::FeaturizeOptions{}.max_rows;

  return CallTorch(
      "projection fidelity", [&]() -> absl::StatusOr<FidelityResult> {
        at::NoGradGuard no_grad;  // the gradient engines enable it themselves
        const at::Tensor train = train_images.narrow(0, 0, n).contiguous();
        const at::Tensor query_images = queries.contiguous();
        const int64_t num_queries = query_images.size(0);
        const size_t num_dims = options.dims.size();
        FidelityResult result;
        result.train_samples = n;
        result.queries = num_queries;

        at::Tensor ref_tracin = at::zeros({num_queries, n}, at::kDouble);
        at::Tensor ref_retrac = at::zeros({num_queries, n}, at::kDouble);
        std::vector<at::Tensor> tracin(num_dims), retrac(num_dims);
        for (size_t d = 0; d < num_dims; ++d) {
          tracin[d] = at::zeros({num_queries, n}, at::kDouble);
          retrac[d] = at::zeros({num_queries, n}, at::kDouble);
        }

        for (int64_t c = 0; c < store_spec.num_checkpoints(); ++c) {
          const double weight = store_spec.model.checkpoints[c].weight;
          ASSIGN_OR_RETURN(std::unique_ptr<model::DiffusionModel> net,
                           run::LoadCheckpointModel(description, c));

          // The featurizer at each D, one at a time (a TorchScript model's
          // parallel engine holds a replica per worker).
          std::vector<ProjectedFeatures> projected;
          std::vector<std::string> selected_names;
          for (size_t d = 0; d < num_dims; ++d) {
            featurize::FeaturizeSpec spec = setup.spec;
            spec.projection.output_dim = options.dims[d];
            const std::string context =
                absl::StrCat("projection fidelity at D = ", options.dims[d]);
            absl::StatusOr<std::unique_ptr<featurize::Featurizer>> featurizer =
                featurize::Featurizer::Create(net.get(), schedule, spec);
            if (!featurizer.ok()) return Annotate(featurizer.status(), context);
            if (d == 0) {
              selected_names = (*featurizer)->selected_parameters();
              result.parameters = (*featurizer)->input_dim();
              setup.spec.bucket_edges = (*featurizer)->spec().bucket_edges;
            }
            absl::StatusOr<ProjectedFeatures> features =
                RunFeaturizer(setup, featurizer->get(), train, query_images, c,
                              weight, store_spec.dtype, &tracin[d], &retrac[d]);
            if (!features.ok()) return Annotate(features.status(), context);
            projected.push_back(*std::move(features));
          }

          // The full-dimensional reference over the same parameters.
          std::vector<int> selected;
          const std::vector<model::NamedParameter> params =
              net->NamedParameters();
          size_t next = 0;
          for (int i = 0; i < static_cast<int>(params.size()); ++i) {
            if (next < selected_names.size() &&
                params[i].name == selected_names[next]) {
              selected.push_back(i);
              ++next;
            }
          }
          if (next != selected_names.size()) {
            return absl::InternalError(
                "projection fidelity: the featurizer's parameters are not in "
                "the model's order");
          }
          ASSIGN_OR_RETURN(
              std::unique_ptr<featurize::internal::GroupGradientEngine> engine,
              featurize::internal::CreateGroupGradientEngine(
                  net.get(), schedule, setup.spec.loss, std::move(selected),
                  featurize::GradientMethod::kAuto));
          ASSIGN_OR_RETURN(Reference ref,
                           ComputeReference(setup, engine.get(), shape, train,
                                            query_images, c));
          ref_tracin += weight * ref.tracin;
          ref_retrac += weight * ref.retrac;
          for (size_t d = 0; d < num_dims; ++d) {
            result.max_norm_rel_error =
                std::max(result.max_norm_rel_error,
                         MaxNormRelError(projected[d].norms, ref.norms));
            result.max_query_rel_error = std::max(
                {result.max_query_rel_error,
                 MaxRowRelError(projected[d].query_raw, ref.query_raw[d]),
                 MaxRowRelError(projected[d].query_unit, ref.query_unit[d])});
          }
        }

        for (size_t d = 0; d < num_dims; ++d) {
          result.rows.push_back(Compare(options.dims[d], "tracin", ref_tracin,
                                        tracin[d], options.top_k));
          result.rows.push_back(Compare(options.dims[d], "retrac", ref_retrac,
                                        retrac[d], options.top_k));
        }
        result.seconds = std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - start)
                             .count();
        return result;
      });
}

}  // namespace retrace::eval

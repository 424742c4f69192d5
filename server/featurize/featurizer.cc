#include "server/featurize/featurizer.h"

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <regex>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/core/kernel_status.h"
#include "server/featurize/timesteps.h"
#include "server/model/counter_rng.h"
#include "server/model/torch_status.h"

namespace retrace::featurize {
namespace {

using model::internal::CallTorch;

// Produces parameter piece i ([rows, numel_i] float32) on demand, so that
// derived pieces (query means) are never all alive at once.
using PieceFn = std::function<at::Tensor(size_t)>;

// Σ over pieces of the squared row norms, in double: [rows]. Each row's
// squares are exact in double and summed in eight interleaved chains, then a
// fixed tree: the same bits on every machine, and fast enough (several sums
// per cycle) to cost a fraction of one read of the gradients.
at::Tensor RowSquaredNorms(size_t num_pieces, int64_t rows,
                           const PieceFn& piece) {
  constexpr int kChains = 8;
  at::Tensor sum = at::zeros({rows}, at::kDouble);
  double* out = sum.data_ptr<double>();
  for (size_t i = 0; i < num_pieces; ++i) {
    const at::Tensor values = piece(i).contiguous();
    const int64_t len = values.size(1);
    const float* data = values.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = data + r * len;
      double chain[kChains] = {};
      int64_t e = 0;
      for (; e + kChains <= len; e += kChains) {
        for (int c = 0; c < kChains; ++c) {
          chain[c] += double(x[e + c]) * double(x[e + c]);
        }
      }
      for (int c = 0; e < len; ++e, ++c)
        chain[c] += double(x[e]) * double(x[e]);
      out[r] += ((chain[0] + chain[4]) + (chain[2] + chain[6])) +
                ((chain[1] + chain[5]) + (chain[3] + chain[7]));
    }
  }
  return sum;
}

// 1/‖row‖ as float32 [rows, 1]; 0 for a zero row, whose projection is then 0.
at::Tensor InverseNorms(const at::Tensor& norms) {
  return at::where(norms > 0, 1.0 / norms, at::zeros_like(norms))
      .to(at::kFloat)
      .unsqueeze(1);
}

// P·(row_scale ⊙ rows), streamed piece by piece at running coordinate
// offsets. row_scale: float32 [rows, 1]. Returns float32 [rows, D].
absl::StatusOr<at::Tensor> ProjectScaledRows(
    const kernels::ProjectionSpec& spec, size_t num_pieces, int64_t rows,
    const PieceFn& piece, const at::Tensor& row_scale) {
  std::unique_ptr<kernels::Projector> projector;
  RETURN_IF_KERNEL_ERROR(kernels::Projector::Create(
      spec, rows, kernels::Backend::kCpu, nullptr, &projector));
  int64_t offset = 0;
  for (size_t i = 0; i < num_pieces; ++i) {
    const at::Tensor scaled = (piece(i) * row_scale).contiguous();
    const int64_t len = scaled.size(1);
    RETURN_IF_KERNEL_ERROR(
        projector->Accumulate(scaled.data_ptr<float>(), len, len, offset, 1.0));
    offset += len;
  }
  at::Tensor out = at::empty({rows, spec.output_dim}, at::kFloat);
  RETURN_IF_KERNEL_ERROR(projector->Finalize(out.data_ptr<float>()));
  return out;
}

// The group gradients in host memory (a no-op for a model on the CPU).
std::vector<at::Tensor> ToHost(std::vector<at::Tensor> pieces) {
  for (at::Tensor& piece : pieces) piece = piece.to(at::kCPU);
  return pieces;
}

absl::Status CheckImages(const at::Tensor& images, const model::ImageShape& s,
                         absl::string_view what) {
  if (!images.defined() || images.dim() != 4 ||
      images.scalar_type() != at::kFloat || images.size(0) < 1 ||
      images.size(1) != s.channels || images.size(2) != s.height ||
      images.size(3) != s.width) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be float32 [B >= 1, ", s.channels, ", ",
                     s.height, ", ", s.width, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

struct Featurizer::Projected {
  at::Tensor unit;   // float32 [rows, D]
  at::Tensor norms;  // float64 [rows]
};

Featurizer::Featurizer(model::DiffusionModel* model,
                       const model::NoiseSchedule& schedule, FeaturizeSpec spec,
                       FeaturizeOptions options)
    : model_(model),
      schedule_(schedule),
      spec_(std::move(spec)),
      options_(options) {}

Featurizer::~Featurizer() = default;

GradientMethod Featurizer::method() const { return engine_->method(); }

int Featurizer::gradient_workers() const { return engine_->workers(); }

absl::StatusOr<std::unique_ptr<Featurizer>> Featurizer::Create(
    model::DiffusionModel* model, const model::NoiseSchedule& schedule,
    FeaturizeSpec spec, FeaturizeOptions options) {
  if (model == nullptr) {
    return absl::InvalidArgumentError("featurizer: model is null");
  }
  const int64_t t_count = schedule.num_timesteps();
  if (spec.bucket_edges.empty()) {
    spec.bucket_edges = EqualBucketEdges(
        std::min<int64_t>(kDefaultNumBuckets, t_count), t_count);
  }
  RETURN_IF_ERROR(
      Annotate(ValidateBucketEdges(spec.bucket_edges, t_count), "featurizer"));
  if (spec.grad_timesteps < 1 || spec.grad_timesteps >= kMaxDrawIndex) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: grad_timesteps must be in [1, ",
                     kMaxDrawIndex, "), got ", spec.grad_timesteps));
  }
  if (options.max_rows < 1) {
    return absl::InvalidArgumentError("featurizer: max_rows must be >= 1");
  }

  std::regex pattern;
  try {
    pattern = std::regex(spec.param_regex, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("featurizer: param_regex '",
                                                   spec.param_regex,
                                                   "' is invalid: ", e.what()));
  }
  std::vector<int> selected;
  std::vector<std::string> names;
  int64_t p = 0;
  const std::vector<model::NamedParameter> params = model->NamedParameters();
  for (int i = 0; i < static_cast<int>(params.size()); ++i) {
    if (spec.param_regex.empty() || std::regex_match(params[i].name, pattern)) {
      selected.push_back(i);
      names.push_back(params[i].name);
      p += params[i].tensor.numel();
    }
  }
  if (selected.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: param_regex '", spec.param_regex,
                     "' matches no parameter name (names look like '",
                     params.empty() ? "" : params.front().name, "')"));
  }
  if (spec.projection.input_dim == 0) spec.projection.input_dim = p;
  if (spec.projection.input_dim != p) {
    return absl::InvalidArgumentError(absl::StrCat(
        "featurizer: projection input_dim ", spec.projection.input_dim,
        " differs from the ", p, " selected parameter coordinates"));
  }
  RETURN_IF_KERNEL_ERROR(kernels::ValidateProjectionSpec(spec.projection));

  model->SetTraining(false);
  auto featurizer = std::unique_ptr<Featurizer>(
      new Featurizer(model, schedule, std::move(spec), options));
  featurizer->selected_names_ = std::move(names);
  ASSIGN_OR_RETURN(
      featurizer->engine_,
      internal::CreateGroupGradientEngine(
          model, schedule, featurizer->spec_.loss, std::move(selected),
          options.method, options.gradient_workers));
  return featurizer;
}

absl::StatusOr<Featurizer::Projected> Featurizer::ProjectUnit(
    const std::vector<at::Tensor>& pieces) {
  const int64_t rows = pieces.front().size(0);
  const PieceFn piece = [&](size_t i) { return pieces[i]; };
  Projected out;
  out.norms = RowSquaredNorms(pieces.size(), rows, piece).sqrt();
  ASSIGN_OR_RETURN(
      out.unit, ProjectScaledRows(spec_.projection, pieces.size(), rows, piece,
                                  InverseNorms(out.norms)));
  return out;
}

absl::StatusOr<TrainFeatures> Featurizer::TrainingSide(
    const at::Tensor& images, int64_t first_index, int64_t checkpoint,
    const ReplayDraws* replay) {
  const model::ImageShape shape = model_->InputShape();
  RETURN_IF_ERROR(CheckImages(images, shape, "featurizer: images"));
  const int64_t batch = images.size(0);
  if (first_index < 0 || first_index + batch > kMaxSampleIndex) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: sample indices ", first_index, "..",
                     first_index + batch - 1, " must lie in [0, 2^32)"));
  }
  if (checkpoint < 0 || checkpoint >= kMaxCheckpoints) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: checkpoint ", checkpoint, " must lie in [0, ",
                     kMaxCheckpoints, ")"));
  }
  if (replay != nullptr) {
    if (!replay->timesteps.defined() || replay->timesteps.dim() != 1 ||
        replay->timesteps.size(0) != batch ||
        replay->timesteps.scalar_type() != at::kLong) {
      return absl::InvalidArgumentError(absl::StrCat(
          "featurizer: replay timesteps must be int64 [", batch, "]"));
    }
    RETURN_IF_ERROR(
        CheckImages(replay->noise, shape, "featurizer: replay noise"));
    if (replay->noise.size(0) != batch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "featurizer: replay noise must hold ", batch, " images"));
    }
  }
  const int64_t buckets = num_buckets();
  const int64_t m = spec_.grad_timesteps;
  const int64_t slots = buckets + (replay != nullptr ? 1 : 0);
  const int64_t dim = spec_.projection.output_dim;
  const int64_t image_numel = shape.channels * shape.height * shape.width;
  const int64_t per_pass = std::max<int64_t>(1, options_.max_rows / m);

  return CallTorch(
      "featurizer training side", [&]() -> absl::StatusOr<TrainFeatures> {
        at::NoGradGuard no_grad;  // the engine enables autograd itself
        TrainFeatures out;
        out.unit = at::zeros({batch, slots, dim}, at::kFloat);
        out.norms = at::zeros({batch, slots}, at::kFloat);
        out.timesteps = at::zeros({batch, buckets, m}, at::kLong);
        // The model's device: the draws are generated on the host (the
        // same bits as on a CPU run) and copied there; the group gradients
        // come back to the host, where the projection runs.
        const at::Device device = model_->device();
        const at::Tensor x_all = images.to(device).contiguous();
        for (int64_t s0 = 0; s0 < batch; s0 += per_pass) {
          const int64_t count = std::min(per_pass, batch - s0);
          const at::Tensor x = x_all.narrow(0, s0, count);
          const at::Tensor x_rows = m == 1 ? x : x.repeat_interleave(m, 0);
          for (int64_t b = 0; b < buckets; ++b) {
            at::Tensor t = at::empty({count * m}, at::kLong);
            at::Tensor eps = at::empty(
                {count * m, shape.channels, shape.height, shape.width},
                at::kFloat);
            int64_t* t_data = t.data_ptr<int64_t>();
            float* eps_data = eps.data_ptr<float>();
            for (int64_t i = 0; i < count; ++i) {
              const int64_t n = first_index + s0 + i;
              for (int64_t j = 0; j < m; ++j) {
                const int64_t row = i * m + j;
                t_data[row] = BuildTimestep(spec_.store_seed, n, checkpoint, b,
                                            j, spec_.bucket_edges[b],
                                            spec_.bucket_edges[b + 1]);
                model::GaussianFill(
                    BuildKey(model::RngStream::kBuildNoise, spec_.store_seed, n,
                             checkpoint, b, j),
                    eps_data + row * image_numel, image_numel);
              }
            }
            out.timesteps.select(1, b)
                .narrow(0, s0, count)
                .copy_(t.reshape({count, m}));
            ASSIGN_OR_RETURN(
                std::vector<at::Tensor> grads,
                engine_->Compute(x_rows, t.to(device), eps.to(device), m));
            ASSIGN_OR_RETURN(Projected projected, ProjectUnit(ToHost(grads)));
            out.unit.select(1, b).narrow(0, s0, count).copy_(projected.unit);
            out.norms.select(1, b).narrow(0, s0, count).copy_(projected.norms);
          }
          if (replay != nullptr) {
            ASSIGN_OR_RETURN(
                std::vector<at::Tensor> grads,
                engine_->Compute(
                    x, replay->timesteps.narrow(0, s0, count).to(device),
                    replay->noise.narrow(0, s0, count).to(device).contiguous(),
                    1));
            ASSIGN_OR_RETURN(Projected projected, ProjectUnit(ToHost(grads)));
            out.unit.select(1, buckets)
                .narrow(0, s0, count)
                .copy_(projected.unit);
            out.norms.select(1, buckets)
                .narrow(0, s0, count)
                .copy_(projected.norms);
          }
        }
        return out;
      });
}

absl::StatusOr<QueryFeatures> Featurizer::QuerySide(
    const at::Tensor& image, int64_t checkpoint, const QueryOptions& options) {
  const model::ImageShape shape = model_->InputShape();
  const at::Tensor x =
      image.defined() && image.dim() == 3 ? image.unsqueeze(0) : image;
  RETURN_IF_ERROR(CheckImages(x, shape, "featurizer: query image"));
  if (x.size(0) != 1) {
    return absl::InvalidArgumentError("featurizer: one query image at a time");
  }
  if (checkpoint < 0 || checkpoint >= kMaxCheckpoints) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: checkpoint ", checkpoint, " must lie in [0, ",
                     kMaxCheckpoints, ")"));
  }
  const int64_t k = options.query_timesteps;
  const int64_t r_count = options.noise_draws;
  if (k < 1 || k >= (int64_t{1} << 16)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "featurizer: query_timesteps must be in [1, 65535], got ", k));
  }
  if (r_count < 1 || r_count >= kMaxDrawIndex) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer: query_noise_draws must be in [1, ",
                     kMaxDrawIndex - 1, "], got ", r_count));
  }
  const int64_t buckets = num_buckets();
  const int64_t groups = buckets * k;  // one group per (bucket, timestep)
  const int64_t image_numel = shape.channels * shape.height * shape.width;
  const int64_t groups_per_pass =
      std::max<int64_t>(1, options_.max_rows / r_count);

  return CallTorch(
      "featurizer query side", [&]() -> absl::StatusOr<QueryFeatures> {
        at::NoGradGuard no_grad;
        QueryFeatures out;
        out.timesteps = at::empty({buckets, k}, at::kLong);
        for (int64_t b = 0; b < buckets; ++b) {
          const std::vector<int64_t> s = QueryTimesteps(
              spec_.bucket_edges[b], spec_.bucket_edges[b + 1], k);
          for (int64_t i = 0; i < k; ++i) out.timesteps[b][i] = s[i];
        }
        const int64_t* s_data = out.timesteps.data_ptr<int64_t>();
        // ḡ for every (bucket, timestep): rows ordered (b, i, r).
        std::vector<at::Tensor> g_bar;
        // Draws on the host, gradients on the model's device, ḡ back on the
        // host (the copy_ into g_bar), where the projection runs.
        const at::Device device = model_->device();
        const at::Tensor x_c = x.to(device).contiguous();
        for (int64_t g0 = 0; g0 < groups; g0 += groups_per_pass) {
          const int64_t count = std::min(groups_per_pass, groups - g0);
          const int64_t rows = count * r_count;
          at::Tensor t = at::empty({rows}, at::kLong);
          at::Tensor eps = at::empty(
              {rows, shape.channels, shape.height, shape.width}, at::kFloat);
          int64_t* t_data = t.data_ptr<int64_t>();
          float* eps_data = eps.data_ptr<float>();
          for (int64_t g = g0; g < g0 + count; ++g) {
            for (int64_t r = 0; r < r_count; ++r) {
              const int64_t row = (g - g0) * r_count + r;
              t_data[row] = s_data[g];
              model::GaussianFill(
                  QueryNoiseKey(options.seed, checkpoint, g / k, g % k, r),
                  eps_data + row * image_numel, image_numel);
            }
          }
          ASSIGN_OR_RETURN(
              std::vector<at::Tensor> grads,
              engine_->Compute(x_c.expand({rows, -1, -1, -1}), t.to(device),
                               eps.to(device), r_count));
          if (g_bar.empty()) {
            for (const at::Tensor& piece : grads) {
              g_bar.push_back(at::empty({groups, piece.size(1)}, at::kFloat));
            }
          }
          for (size_t i = 0; i < grads.size(); ++i) {
            g_bar[i].narrow(0, g0, count).copy_(grads[i]);
          }
        }
        const size_t pieces = g_bar.size();
        // mean over the k timesteps of each bucket: [buckets, numel].
        const PieceFn raw_piece = [&](size_t i) {
          return g_bar[i].reshape({buckets, k, -1}).mean(1);
        };
        const PieceFn g_piece = [&](size_t i) { return g_bar[i]; };
        const at::Tensor g_norms =
            RowSquaredNorms(pieces, groups, g_piece).sqrt();
        const at::Tensor raw_norms =
            RowSquaredNorms(pieces, buckets, raw_piece).sqrt();
        // mean_s ḡ(s)/‖ḡ(s)‖: a mean of unit vectors, so its L1 norm stays
        // below √p and the accumulator in range.
        const at::Tensor g_inv = InverseNorms(g_norms).reshape({buckets, k, 1});
        const PieceFn unit_piece = [&](size_t i) {
          return (g_bar[i].reshape({buckets, k, -1}) * g_inv).mean(1);
        };
        const auto project_start = std::chrono::steady_clock::now();
        ASSIGN_OR_RETURN(
            out.unit,
            ProjectScaledRows(spec_.projection, pieces, buckets, unit_piece,
                              at::ones({buckets, 1}, at::kFloat)));
        // q_raw = ‖mean‖ · P(mean/‖mean‖): unit rows keep the fixed point
        // in range.
        ASSIGN_OR_RETURN(at::Tensor raw_unit,
                         ProjectScaledRows(spec_.projection, pieces, buckets,
                                           raw_piece, InverseNorms(raw_norms)));
        out.raw =
            (raw_unit.to(at::kDouble) * raw_norms.unsqueeze(1)).to(at::kFloat);
        out.project_seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                          project_start)
                .count();
        return out;
      });
}

}  // namespace retrace::featurize

// Per-sample gradients, norms and projected features of the featurizer,
// checked against independent computations: one backward pass per sample
// through the model's own Forward (the loop), double-precision finite
// differences, and a dense projection matrix applied in double precision.
#include "server/featurize/featurizer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "server/featurize/group_gradients.h"
#include "server/featurize/unet_mirror.h"
#include "server/model/counter_rng.h"
#include "server/model/unet.h"

namespace retrace::featurize {
namespace {

using model::LossType;
using model::NoiseSchedule;
using model::UNetConfig;
using model::UNetModel;

// Batched and one-at-a-time gradients differ only by float32 summation
// order: |a − b| <= kGradRelTol · max|g| of the row (a row is one sample's
// gradient of one parameter tensor) + kGradAbsTol.
constexpr double kGradRelTol = 2e-5;
constexpr double kGradAbsTol = 1e-9;
// Norms: relative.
constexpr double kNormRelTol = 1e-5;
// Projected unit vectors against the dense double-precision reference:
// absolute per coordinate (float gradients, 2^-32 fixed point, float output).
constexpr double kUnitAbsTol = 2e-5;
// Finite differences (central, h = 1e-5, double) against float gradients.
constexpr double kFdRelTol = 1e-3;
constexpr double kFdStep = 1e-5;

UNetConfig TinyConfig() {
  UNetConfig config;
  config.base_channels = 4;
  config.channel_mults = {1, 2};
  config.norm_groups = 2;
  config.image_size = 8;
  return config;
}

std::unique_ptr<UNetModel> MakeUNet(const UNetConfig& config, uint64_t seed) {
  auto model = UNetModel::Create(config, seed);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

NoiseSchedule Cosine() { return *NoiseSchedule::Create(); }

struct Rows {
  at::Tensor x, t, eps;
};

Rows MakeRows(const UNetConfig& config, int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  Rows r;
  r.x =
      at::rand({n, config.image_channels, config.image_size, config.image_size},
               gen) *
          2 -
      1;
  r.eps = at::randn(r.x.sizes(), gen);
  r.t = at::randint(0, 1000, {n}, gen, at::kLong);
  return r;
}

std::vector<int> AllIndices(const model::DiffusionModel& model) {
  std::vector<int> out(model.NamedParameters().size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int>(i);
  return out;
}

// A model that hides the UNet behind the plain interface (as a TorchScript
// model would be), so only the loop can serve it.
class OpaqueModel final : public model::DiffusionModel {
 public:
  explicit OpaqueModel(model::DiffusionModel* inner) : inner_(inner) {}
  absl::StatusOr<at::Tensor> Forward(const at::Tensor& x_t,
                                     const at::Tensor& t) override {
    return inner_->Forward(x_t, t);
  }
  std::vector<model::NamedParameter> NamedParameters() const override {
    return inner_->NamedParameters();
  }
  std::string Architecture() const override { return "opaque"; }
  model::ImageShape InputShape() const override { return inner_->InputShape(); }
  void SetTraining(bool training) override { inner_->SetTraining(training); }
  absl::Status Save(const std::string& path) const override {
    return inner_->Save(path);
  }
  absl::Status Load(const std::string& path) override {
    return inner_->Load(path);
  }

 private:
  model::DiffusionModel* inner_;
};

void ExpectGradientsClose(const std::vector<at::Tensor>& got,
                          const std::vector<at::Tensor>& want,
                          const std::vector<model::NamedParameter>& params) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(params[i].name);
    ASSERT_EQ(got[i].sizes().vec(), want[i].sizes().vec());
    const at::Tensor scale =
        want[i].abs().amax(1, /*keepdim=*/true).to(at::kDouble);
    const at::Tensor diff = (got[i] - want[i]).abs().to(at::kDouble);
    const at::Tensor excess = diff - (kGradRelTol * scale + kGradAbsTol);
    EXPECT_LE(excess.max().item<double>(), 0.0)
        << "max |diff| " << diff.max().item<double>() << " max |g| "
        << scale.max().item<double>();
  }
}

TEST(UNetMirrorTest, ReproducesTheModelBitForBit) {
  for (const UNetConfig& config : {UNetConfig{}, TinyConfig()}) {
    auto model = MakeUNet(config, 3);
    auto mirror =
        internal::UNetMirror::Create(config, model->NamedParameters());
    ASSERT_TRUE(mirror.ok()) << mirror.status();
    Rows rows = MakeRows(config, 3, 5);
    at::NoGradGuard no_grad;
    auto want = model->Forward(rows.x, rows.t);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_TRUE(
        at::equal(mirror->Forward(rows.x, rows.t, nullptr, nullptr), *want));
  }
}

// The batched per-sample gradients against one backward pass per group.
void CheckLayerwiseAgainstLoop(const UNetConfig& config, LossType loss,
                               int64_t rows_count, int64_t group_size) {
  SCOPED_TRACE(testing::Message()
               << "loss=" << model::LossTypeName(loss) << " rows=" << rows_count
               << " k=" << group_size << " base=" << config.base_channels);
  auto model = MakeUNet(config, 11);
  const NoiseSchedule schedule = Cosine();
  auto layerwise = internal::CreateGroupGradientEngine(
      model.get(), schedule, loss, AllIndices(*model),
      GradientMethod::kLayerwise);
  ASSERT_TRUE(layerwise.ok()) << layerwise.status();
  ASSERT_EQ((*layerwise)->method(), GradientMethod::kLayerwise);
  auto loop = internal::CreateGroupGradientEngine(
      model.get(), schedule, loss, AllIndices(*model), GradientMethod::kLoop);
  ASSERT_TRUE(loop.ok()) << loop.status();
  Rows rows = MakeRows(config, rows_count, 21);
  auto got = (*layerwise)->Compute(rows.x, rows.t, rows.eps, group_size);
  ASSERT_TRUE(got.ok()) << got.status();
  auto want = (*loop)->Compute(rows.x, rows.t, rows.eps, group_size);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(got->front().size(0), rows_count / group_size);
  ExpectGradientsClose(*got, *want, model->NamedParameters());
}

TEST(GroupGradientsTest, LayerwiseEqualsLoopPerSample) {
  CheckLayerwiseAgainstLoop(UNetConfig{}, LossType::kMse, 5, 1);
  CheckLayerwiseAgainstLoop(TinyConfig(), LossType::kMse, 7, 1);
  CheckLayerwiseAgainstLoop(TinyConfig(), LossType::kL1, 4, 1);
}

TEST(GroupGradientsTest, LayerwiseEqualsLoopForGroups) {
  CheckLayerwiseAgainstLoop(UNetConfig{}, LossType::kMse, 6, 3);
  CheckLayerwiseAgainstLoop(TinyConfig(), LossType::kL1, 8, 4);
}

TEST(GroupGradientsTest, LayerwiseMatchesDoubleFiniteDifferences) {
  const UNetConfig config = TinyConfig();
  auto model = MakeUNet(config, 17);
  const NoiseSchedule schedule = Cosine();
  const std::vector<model::NamedParameter> params = model->NamedParameters();
  auto engine = internal::CreateGroupGradientEngine(
      model.get(), schedule, LossType::kMse, AllIndices(*model),
      GradientMethod::kLayerwise);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Rows rows = MakeRows(config, 2, 23);
  rows.t = at::tensor(std::vector<int64_t>{40, 620}, at::kLong);
  auto grads = (*engine)->Compute(rows.x, rows.t, rows.eps, 1);
  ASSERT_TRUE(grads.ok()) << grads.status();

  // The loss in double: x_t from the schedule's double coefficients, the
  // mirror run on double copies of the parameters.
  std::vector<model::NamedParameter> dparams;
  for (const auto& p : params) {
    dparams.push_back({p.name, p.tensor.detach().to(at::kDouble).clone()});
  }
  auto dmirror = internal::UNetMirror::Create(config, dparams);
  ASSERT_TRUE(dmirror.ok()) << dmirror.status();
  at::NoGradGuard no_grad;
  const int64_t sample = 1;
  const int64_t t = rows.t[sample].item<int64_t>();
  const at::Tensor x = rows.x.narrow(0, sample, 1).to(at::kDouble);
  const at::Tensor eps = rows.eps.narrow(0, sample, 1).to(at::kDouble);
  const at::Tensor x_t =
      schedule.SignalScale(t) * x + schedule.NoiseScale(t) * eps;
  const at::Tensor t1 = rows.t.narrow(0, sample, 1);
  auto loss = [&]() {
    at::Tensor d = eps - dmirror->Forward(x_t, t1, nullptr, nullptr);
    return (d * d).mean().item<double>();
  };
  int checked = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    // Every parameter tensor: Linear, Conv2d and GroupNorm weights and biases.
    at::Tensor flat = dparams[i].tensor.view({-1});
    for (int64_t coord : {int64_t{0}, flat.numel() / 2}) {
      SCOPED_TRACE(testing::Message() << params[i].name << "[" << coord << "]");
      const double saved = flat[coord].item<double>();
      flat[coord] = saved + kFdStep;
      const double up = loss();
      flat[coord] = saved - kFdStep;
      const double down = loss();
      flat[coord] = saved;
      const double fd = (up - down) / (2 * kFdStep);
      const double g = (*grads)[i][sample][coord].item<double>();
      const double scale = (*grads)[i][sample].abs().max().item<double>();
      EXPECT_NEAR(g, fd, kFdRelTol * std::max(std::abs(fd), 1e-2 * scale));
      ++checked;
    }
  }
  EXPECT_GT(checked, 40);
}

// Columns of P, extracted by projecting unit vectors (coordinate i at its
// global offset): the dense [D, p] matrix in double.
at::Tensor DenseProjection(const kernels::ProjectionSpec& spec) {
  const int64_t p = spec.input_dim;
  at::Tensor dense = at::empty({spec.output_dim, p}, at::kDouble);
  constexpr int64_t kChunk = 512;
  for (int64_t i0 = 0; i0 < p; i0 += kChunk) {
    const int64_t count = std::min(kChunk, p - i0);
    at::Tensor eye = at::eye(count, at::kFloat).contiguous();
    std::unique_ptr<kernels::Projector> projector;
    EXPECT_TRUE(kernels::Projector::Create(spec, count, kernels::Backend::kCpu,
                                           nullptr, &projector)
                    .ok());
    EXPECT_TRUE(
        projector->Accumulate(eye.data_ptr<float>(), count, count, i0).ok());
    at::Tensor out = at::empty({count, spec.output_dim}, at::kFloat);
    EXPECT_TRUE(projector->Finalize(out.data_ptr<float>()).ok());
    dense.narrow(1, i0, count).copy_(out.t());
  }
  return dense;
}

// [rows, p] in double: the pieces concatenated (the test may do what the
// featurizer must not).
at::Tensor Concat(const std::vector<at::Tensor>& pieces) {
  return at::cat(pieces, 1).to(at::kDouble);
}

struct TrainCase {
  std::string regex;
  int64_t grad_timesteps = 1;
  bool replay = false;
  GradientMethod method = GradientMethod::kAuto;
  kernels::ProjectionType type = kernels::ProjectionType::kSjlt;
};

FeaturizeSpec TinySpec(const TrainCase& c) {
  FeaturizeSpec spec;
  spec.bucket_edges = {0, 100, 400, 1000};
  spec.grad_timesteps = c.grad_timesteps;
  spec.store_seed = 0xabc;
  spec.projection.type = c.type;
  spec.projection.output_dim = 24;
  spec.projection.sparsity = 3;
  spec.projection.seed = 77;
  spec.param_regex = c.regex;
  return spec;
}

// The training side against an independent computation: timesteps and noise
// regenerated from the documented keys, gradients from the loop engine, the
// norm and P·g/‖g‖ in double with the dense matrix.
void CheckTrainingSide(const TrainCase& c) {
  SCOPED_TRACE(testing::Message()
               << "regex='" << c.regex << "' m=" << c.grad_timesteps
               << " replay=" << c.replay
               << " method=" << GradientMethodName(c.method));
  const UNetConfig config = TinyConfig();
  auto unet = MakeUNet(config, 29);
  const NoiseSchedule schedule = Cosine();
  FeaturizeSpec spec = TinySpec(c);
  FeaturizeOptions options;
  options.max_rows = 3;  // several passes per call
  options.method = c.method;
  auto featurizer = Featurizer::Create(unet.get(), schedule, spec, options);
  ASSERT_TRUE(featurizer.ok()) << featurizer.status();
  const Featurizer& f = **featurizer;
  ASSERT_EQ(f.method(), c.method == GradientMethod::kLoop
                            ? GradientMethod::kLoop
                            : GradientMethod::kLayerwise);

  // Which parameters the regex selects, decided here independently.
  std::vector<int> selected;
  std::vector<model::NamedParameter> params = unet->NamedParameters();
  int64_t p = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].name;
    const bool keep =
        c.regex.empty() ||
        (c.regex == "up\\..*" && name.rfind("up.", 0) == 0) ||
        (c.regex == ".*norm.*" && name.find("norm") != std::string::npos);
    if (keep) {
      selected.push_back(static_cast<int>(i));
      p += params[i].tensor.numel();
    }
  }
  ASSERT_EQ(f.input_dim(), p);
  ASSERT_EQ(f.selected_parameters().size(), selected.size());

  constexpr int64_t kBatch = 4, kFirst = 1000, kCheckpoint = 2;
  const Rows data = MakeRows(config, kBatch, 31);
  ReplayDraws replay;
  replay.timesteps =
      at::tensor(std::vector<int64_t>{5, 999, 300, 77}, at::kLong);
  replay.noise = MakeRows(config, kBatch, 37).eps;
  auto features = (*featurizer)
                      ->TrainingSide(data.x, kFirst, kCheckpoint,
                                     c.replay ? &replay : nullptr);
  ASSERT_TRUE(features.ok()) << features.status();
  const int64_t buckets = 3, slots = buckets + (c.replay ? 1 : 0);
  const int64_t m = c.grad_timesteps, d = spec.projection.output_dim;
  ASSERT_EQ(features->unit.sizes().vec(),
            (std::vector<int64_t>{kBatch, slots, d}));
  ASSERT_EQ(features->norms.sizes().vec(),
            (std::vector<int64_t>{kBatch, slots}));
  ASSERT_EQ(features->timesteps.sizes().vec(),
            (std::vector<int64_t>{kBatch, buckets, m}));

  auto loop = internal::CreateGroupGradientEngine(
      unet.get(), schedule, spec.loss, selected, GradientMethod::kLoop);
  ASSERT_TRUE(loop.ok()) << loop.status();
  kernels::ProjectionSpec pspec = spec.projection;
  pspec.input_dim = p;
  const at::Tensor dense = DenseProjection(pspec);
  const int64_t image_numel = config.image_size * config.image_size;
  for (int64_t i = 0; i < kBatch; ++i) {
    for (int64_t s = 0; s < slots; ++s) {
      SCOPED_TRACE(testing::Message() << "sample " << i << " slot " << s);
      at::Tensor t = at::empty({s < buckets ? m : 1}, at::kLong);
      at::Tensor eps = at::empty(
          {t.size(0), 1, config.image_size, config.image_size}, at::kFloat);
      if (s < buckets) {
        for (int64_t j = 0; j < m; ++j) {
          // Keys as documented: (store seed; n, c << 16 | b, j).
          const model::RngKey tkey{
              spec.store_seed, model::RngStream::kBuildTimestep,
              static_cast<uint32_t>(kFirst + i),
              static_cast<uint32_t>((kCheckpoint << 16) | s),
              static_cast<uint32_t>(j)};
          model::RngKey nkey = tkey;
          nkey.stream = model::RngStream::kBuildNoise;
          const int64_t lo = spec.bucket_edges[s],
                        hi = spec.bucket_edges[s + 1];
          t[j] = model::UniformInt(tkey, lo, hi);
          const int64_t got_t = features->timesteps[i][s][j].item<int64_t>();
          EXPECT_EQ(got_t, t[j].item<int64_t>());
          EXPECT_GE(got_t, lo);
          EXPECT_LT(got_t, hi);
          model::GaussianFill(nkey, eps.data_ptr<float>() + j * image_numel,
                              image_numel);
        }
      } else {
        t[0] = replay.timesteps[i];
        eps.copy_(replay.noise.narrow(0, i, 1));
      }
      const at::Tensor x =
          data.x.narrow(0, i, 1).expand({t.size(0), -1, -1, -1});
      auto grads = (*loop)->Compute(x.contiguous(), t, eps, t.size(0));
      ASSERT_TRUE(grads.ok()) << grads.status();
      const at::Tensor g = Concat(*grads)[0];
      const double norm = g.norm().item<double>();
      EXPECT_NEAR(features->norms[i][s].item<double>(), norm,
                  kNormRelTol * norm);
      const at::Tensor want = at::matmul(dense, g / norm);
      const double err = (features->unit[i][s].to(at::kDouble) - want)
                             .abs()
                             .max()
                             .item<double>();
      EXPECT_LE(err, kUnitAbsTol);
    }
  }
}

TEST(FeaturizerTest, TrainingSideAllParameters) { CheckTrainingSide({}); }

TEST(FeaturizerTest, TrainingSideSelectedParametersAndReplay) {
  CheckTrainingSide({"up\\..*", 1, /*replay=*/true});
  CheckTrainingSide({".*norm.*", 1, /*replay=*/true, GradientMethod::kAuto,
                     kernels::ProjectionType::kRademacher});
}

TEST(FeaturizerTest, TrainingSideSeveralTimestepsPerBucket) {
  CheckTrainingSide({"", 3, /*replay=*/false});
}

TEST(FeaturizerTest, TrainingSideLoopMethod) {
  CheckTrainingSide({"", 2, /*replay=*/true, GradientMethod::kLoop});
}

TEST(FeaturizerTest, SameSeedsGiveIdenticalBytes) {
  const UNetConfig config = TinyConfig();
  auto unet = MakeUNet(config, 41);
  const NoiseSchedule schedule = Cosine();
  const Rows data = MakeRows(config, 5, 43);
  auto run = [&](uint64_t store_seed) {
    FeaturizeSpec spec = TinySpec({"", 2});
    spec.store_seed = store_seed;
    auto featurizer = Featurizer::Create(unet.get(), schedule, spec);
    EXPECT_TRUE(featurizer.ok()) << featurizer.status();
    auto features = (*featurizer)->TrainingSide(data.x, 0, 1);
    EXPECT_TRUE(features.ok()) << features.status();
    QueryOptions query;
    query.seed = 9;
    auto q = (*featurizer)->QuerySide(data.x[0], 1, query);
    EXPECT_TRUE(q.ok()) << q.status();
    return std::vector<at::Tensor>{features->unit, features->norms,
                                   features->timesteps, q->raw, q->unit};
  };
  const std::vector<at::Tensor> a = run(5), b = run(5), other = run(6);
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_EQ(a[i].nbytes(), b[i].nbytes());
    EXPECT_EQ(std::memcmp(a[i].data_ptr(), b[i].data_ptr(), a[i].nbytes()), 0);
  }
  EXPECT_FALSE(at::equal(a[0], other[0]));  // another store seed, other draws
  EXPECT_TRUE(at::equal(a[3], other[3]));   // the query depends on its own seed
}

// The query side against the formula computed directly: per-draw gradients
// from the loop, ḡ(s) = mean_r, then P·mean_s ḡ(s) and P·mean_s ḡ(s)/‖ḡ(s)‖
// with the dense matrix in double.
TEST(FeaturizerTest, QuerySideMatchesDirectFormula) {
  const UNetConfig config = TinyConfig();
  auto unet = MakeUNet(config, 47);
  const NoiseSchedule schedule = Cosine();
  FeaturizeSpec spec = TinySpec({"", 1});
  FeaturizeOptions options;
  options.max_rows = 5;  // passes split groups of draws across bucket edges
  auto featurizer = Featurizer::Create(unet.get(), schedule, spec, options);
  ASSERT_TRUE(featurizer.ok()) << featurizer.status();
  QueryOptions query;
  query.query_timesteps = 3;
  query.noise_draws = 2;
  query.seed = 1234;
  constexpr int64_t kCheckpoint = 4;
  const at::Tensor image = MakeRows(config, 1, 53).x[0];
  auto q = (*featurizer)->QuerySide(image, kCheckpoint, query);
  ASSERT_TRUE(q.ok()) << q.status();
  const int64_t buckets = 3, k = 3, r_count = 2;
  ASSERT_EQ(q->raw.sizes().vec(), (std::vector<int64_t>{buckets, 24}));
  ASSERT_EQ(q->unit.sizes().vec(), (std::vector<int64_t>{buckets, 24}));

  auto loop = internal::CreateGroupGradientEngine(unet.get(), schedule,
                                                  spec.loss, AllIndices(*unet),
                                                  GradientMethod::kLoop);
  ASSERT_TRUE(loop.ok());
  kernels::ProjectionSpec pspec = spec.projection;
  pspec.input_dim = (*featurizer)->input_dim();
  const at::Tensor dense = DenseProjection(pspec);
  const int64_t image_numel = config.image_size * config.image_size;
  for (int64_t b = 0; b < buckets; ++b) {
    SCOPED_TRACE(testing::Message() << "bucket " << b);
    const int64_t lo = spec.bucket_edges[b], hi = spec.bucket_edges[b + 1];
    at::Tensor raw = at::zeros({pspec.input_dim}, at::kDouble);
    at::Tensor unit = at::zeros({pspec.input_dim}, at::kDouble);
    for (int64_t i = 0; i < k; ++i) {
      // Centre of the i-th of k equal sub-intervals of [lo, hi), floored.
      const int64_t s = lo + (2 * i + 1) * (hi - lo) / (2 * k);
      EXPECT_EQ(q->timesteps[b][i].item<int64_t>(), s);
      at::Tensor g_bar = at::zeros({pspec.input_dim}, at::kDouble);
      for (int64_t r = 0; r < r_count; ++r) {
        const model::RngKey key{query.seed, model::RngStream::kQueryNoise,
                                static_cast<uint32_t>(kCheckpoint),
                                static_cast<uint32_t>((b << 16) | i),
                                static_cast<uint32_t>(r)};
        at::Tensor eps =
            at::empty({1, 1, config.image_size, config.image_size});
        model::GaussianFill(key, eps.data_ptr<float>(), image_numel);
        auto grads = (*loop)->Compute(image.unsqueeze(0),
                                      at::full({1}, s, at::kLong), eps, 1);
        ASSERT_TRUE(grads.ok()) << grads.status();
        g_bar += Concat(*grads)[0] / double(r_count);
      }
      raw += g_bar / double(k);
      unit += g_bar / g_bar.norm() / double(k);
    }
    const at::Tensor want_raw = at::matmul(dense, raw);
    const at::Tensor want_unit = at::matmul(dense, unit);
    const double raw_scale = want_raw.abs().max().item<double>();
    EXPECT_LE((q->raw[b].to(at::kDouble) - want_raw).abs().max().item<double>(),
              1e-4 * raw_scale);
    EXPECT_LE(
        (q->unit[b].to(at::kDouble) - want_unit).abs().max().item<double>(),
        kUnitAbsTol);
  }
}

TEST(FeaturizerTest, OpaqueModelsUseTheLoop) {
  auto unet = MakeUNet(TinyConfig(), 59);
  OpaqueModel opaque(unet.get());
  const NoiseSchedule schedule = Cosine();
  auto auto_f = Featurizer::Create(&opaque, schedule, TinySpec({}));
  ASSERT_TRUE(auto_f.ok()) << auto_f.status();
  EXPECT_EQ((*auto_f)->method(), GradientMethod::kLoop);
  FeaturizeOptions options;
  options.method = GradientMethod::kLayerwise;
  auto layerwise = Featurizer::Create(&opaque, schedule, TinySpec({}), options);
  EXPECT_EQ(layerwise.status().code(), absl::StatusCode::kFailedPrecondition);

  // The loop and the layerwise featurizers agree on the same model.
  auto direct = Featurizer::Create(unet.get(), schedule, TinySpec({}));
  ASSERT_TRUE(direct.ok());
  const Rows data = MakeRows(TinyConfig(), 3, 61);
  auto a = (*auto_f)->TrainingSide(data.x, 7, 0);
  auto b = (*direct)->TrainingSide(data.x, 7, 0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(at::allclose(a->norms, b->norms, kNormRelTol, 0));
  EXPECT_LE((a->unit - b->unit).abs().max().item<double>(), kUnitAbsTol);
}

// The caller's checkpoint loop: one featurizer, the model loading θ_c in
// between, gives what a featurizer created after the load gives.
TEST(FeaturizerTest, FollowsCheckpointLoads) {
  const UNetConfig config = TinyConfig();
  auto other = MakeUNet(config, 73);
  const std::string path = testing::TempDir() + "/featurize_checkpoint_" +
                           std::to_string(::getpid());
  ASSERT_TRUE(other->Save(path).ok());
  const NoiseSchedule schedule = Cosine();
  const Rows data = MakeRows(config, 3, 79);
  for (GradientMethod method :
       {GradientMethod::kLayerwise, GradientMethod::kLoop}) {
    SCOPED_TRACE(GradientMethodName(method));
    auto model = MakeUNet(config, 71);
    FeaturizeOptions options;
    options.method = method;
    auto before =
        Featurizer::Create(model.get(), schedule, TinySpec({}), options);
    ASSERT_TRUE(before.ok()) << before.status();
    auto first = (*before)->TrainingSide(data.x, 0, 0);
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE(model->Load(path).ok());
    auto second = (*before)->TrainingSide(data.x, 0, 1);
    auto fresh =
        Featurizer::Create(model.get(), schedule, TinySpec({}), options);
    ASSERT_TRUE(fresh.ok());
    auto want = (*fresh)->TrainingSide(data.x, 0, 1);
    ASSERT_TRUE(second.ok() && want.ok());
    EXPECT_TRUE(at::equal(second->unit, want->unit));
    EXPECT_TRUE(at::equal(second->norms, want->norms));
    EXPECT_FALSE(at::allclose(first->norms, second->norms));
  }
  std::remove(path.c_str());
}

TEST(FeaturizerTest, RejectsBadSpecsAndInputs) {
  auto unet = MakeUNet(TinyConfig(), 67);
  const NoiseSchedule schedule = Cosine();
  auto create = [&](FeaturizeSpec spec) {
    return Featurizer::Create(unet.get(), schedule, spec).status().code();
  };
  FeaturizeSpec spec = TinySpec({});
  spec.param_regex = "(";
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);
  spec.param_regex = "no_such_parameter";
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);
  spec = TinySpec({});
  spec.bucket_edges = {0, 500, 400, 1000};
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);
  spec = TinySpec({});
  spec.grad_timesteps = 0;
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);
  spec = TinySpec({});
  spec.projection.input_dim = 5;
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);
  spec = TinySpec({});
  spec.projection.output_dim = 0;
  EXPECT_EQ(create(spec), absl::StatusCode::kInvalidArgument);

  // Default edges: ten equal buckets.
  spec = TinySpec({});
  spec.bucket_edges.clear();
  auto featurizer = Featurizer::Create(unet.get(), schedule, spec);
  ASSERT_TRUE(featurizer.ok());
  EXPECT_EQ((*featurizer)->num_buckets(), 10);
  EXPECT_EQ((*featurizer)->spec().bucket_edges[3], 300);
  Featurizer& f = **featurizer;
  EXPECT_EQ(f.TrainingSide(at::zeros({2, 1, 9, 9}), 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.TrainingSide(at::zeros({2, 1, 8, 8}), -1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.TrainingSide(at::zeros({2, 1, 8, 8}), 0, 1 << 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  ReplayDraws bad;
  bad.timesteps = at::zeros({3}, at::kLong);
  bad.noise = at::zeros({2, 1, 8, 8});
  EXPECT_EQ(f.TrainingSide(at::zeros({2, 1, 8, 8}), 0, 0, &bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  at::Tensor nan_image = at::full({1, 1, 8, 8}, NAN);
  EXPECT_EQ(f.TrainingSide(nan_image, 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  QueryOptions query;
  query.noise_draws = 0;
  EXPECT_EQ(f.QuerySide(at::zeros({1, 8, 8}), 0, query).status().code(),
            absl::StatusCode::kInvalidArgument);
  query = QueryOptions{};
  EXPECT_EQ(f.QuerySide(at::zeros({2, 1, 8, 8}), 0, query).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::featurize

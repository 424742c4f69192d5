// Projection fidelity on a tiny built-in UNet (two checkpoints with random
// weights, nothing trained): the full-dimensional reference re-derives the
// store's draws on its own, so its norms and query vectors must match the
// featurizer's (float summation order only), and at a projection dimension
// close to p the projected ranking must nearly reproduce the reference's.
#include "jobs/eval/fidelity.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "server/model/unet.h"
#include "server/run/model_description.h"
#include "server/store/manifest.h"

namespace retrace::eval {
namespace {

namespace fs = std::filesystem;

// The reference and the featurizer compute the same gradients with different
// float summation orders; a different draw or parameter set would be off by
// orders of magnitude more (docs/evaluation.md: a wrong store seed gives norms
// off by a factor of 9).
constexpr double kNormRelTol = 1e-4;
constexpr double kQueryRelTol = 1e-4;
// At D = 4096 against p = 8101 (all parameters) or 3384 (the decoder) the
// SJLT preserves inner products to a few percent, which keeps the rank
// correlation high (measured 0.96-0.98).
constexpr double kMinSpearmanAtLargestD = 0.9;

constexpr int64_t kImageSide = 8;
constexpr uint64_t kImageSeed = 17;

model::UNetConfig TinyUNet() {
  model::UNetConfig config;
  config.base_channels = 4;
  config.channel_mults = {1, 2};
  config.attention = false;
  config.norm_groups = 2;
  config.image_channels = 1;
  config.image_size = kImageSide;
  return config;
}

struct TinyStore {
  run::ModelDescription description;
  store::Manifest manifest;
};

// model.toml with two checkpoints of random weights (seeds 1 and 2) in a
// fresh folder, loaded back (so the hashes are filled in), and the manifest
// of a store that would have been built from it.
TinyStore MakeTinyStore(const std::string& name, const std::string& loss,
                        const std::string& param_regex) {
  const std::string dir = ::testing::TempDir() + "/retrace-fidelity-" + name +
                          "-" + std::to_string(::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  run::ModelDescription d;
  d.kind = run::ModelKind::kBuiltinUNet;
  d.unet = TinyUNet();
  d.image = {1, kImageSide, kImageSide, -1.0, 1.0};
  d.loss = loss;
  d.data.source = "folder";
  d.data.path = "data";
  int64_t p = 0;
  for (int c = 0; c < 2; ++c) {
    auto unet = model::UNetModel::Create(d.unet, /*seed=*/c + 1);
    EXPECT_TRUE(unet.ok()) << unet.status();
    const std::string file = "ckpt-" + std::to_string(c) + ".pt";
    EXPECT_TRUE((*unet)->Save(dir + "/" + file).ok());
    run::CheckpointDescription checkpoint;
    checkpoint.file = file;
    checkpoint.weight = c == 0 ? 0.5 : 0.25;
    checkpoint.step = 10 * (c + 1);
    d.checkpoints.push_back(checkpoint);
    p = 0;
    for (const model::NamedParameter& param : (*unet)->NamedParameters()) {
      p += param.tensor.numel();
    }
  }
  std::ofstream(dir + "/model.toml") << run::FormatModelDescription(d);

  TinyStore out;
  auto loaded = run::LoadModelDescription(dir + "/model.toml");
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  out.description = *loaded;
  store::StoreSpec& spec = out.manifest.spec;
  run::RecordInStoreSpec(out.description, &spec);
  spec.buckets.edges = {0, 250, 500, 750, 1000};
  spec.grad_timesteps = 2;
  spec.projection.type = kernels::ProjectionType::kSjlt;
  spec.projection.dim = 64;  // the store's own D; the measurement picks its own
  spec.projection.sparsity = 4;
  spec.projection.seed = 3;
  spec.projection.param_regex = param_regex;
  spec.projection.input_dim = param_regex.empty() ? p : 0;
  spec.dtype = kernels::DType::kF16;
  spec.dataset = {{"name", "tiny"}, {"store_seed", uint64_t{5}}};
  return out;
}

at::Tensor RandomImages(int64_t count, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::rand({count, 1, kImageSide, kImageSide}, gen) * 2 - 1;
}

FidelityOptions SmallOptions() {
  FidelityOptions options;
  options.dims = {32, 512, 4096};
  options.train_samples = 12;
  options.top_k = 3;
  options.query_timesteps = 2;
  options.noise_draws = 2;
  options.request_seed = 9;
  return options;
}

void ExpectSound(const FidelityResult& r, const FidelityOptions& options) {
  ASSERT_EQ(r.rows.size(), 2 * options.dims.size());
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const FidelityRow& row = r.rows[i];
    SCOPED_TRACE(::testing::Message()
                 << "D = " << row.dim << " " << row.method);
    EXPECT_EQ(row.dim, options.dims[i / 2]);
    EXPECT_EQ(row.method, i % 2 == 0 ? "tracin" : "retrac");
    for (double v : {row.spearman_mean, row.spearman_min}) {
      EXPECT_GE(v, -1.0);
      EXPECT_LE(v, 1.0);
    }
    for (double v : {row.recall_mean, row.recall_min}) {
      EXPECT_GE(v, 0.0);
      EXPECT_LE(v, 1.0);
    }
    EXPECT_LE(row.spearman_min, row.spearman_mean);
    EXPECT_LE(row.recall_min, row.recall_mean);
  }
  EXPECT_LE(r.max_norm_rel_error, kNormRelTol);
  EXPECT_LE(r.max_query_rel_error, kQueryRelTol);
  for (size_t i = r.rows.size() - 2; i < r.rows.size(); ++i) {
    SCOPED_TRACE(r.rows[i].method);
    EXPECT_GE(r.rows[i].spearman_mean, kMinSpearmanAtLargestD);
  }
  EXPECT_GT(r.seconds, 0.0);
}

void Print(const FidelityResult& r) {
  std::printf("p = %lld, n = %lld, queries = %lld, %.2f s\n",
              static_cast<long long>(r.parameters),
              static_cast<long long>(r.train_samples),
              static_cast<long long>(r.queries), r.seconds);
  std::printf("max norm rel error %.3g, max query rel error %.3g\n",
              r.max_norm_rel_error, r.max_query_rel_error);
  for (const FidelityRow& row : r.rows) {
    std::printf(
        "D %5lld %-6s spearman %.4f (min %.4f) recall %.3f (min %.3f)\n",
        static_cast<long long>(row.dim), row.method.c_str(), row.spearman_mean,
        row.spearman_min, row.recall_mean, row.recall_min);
  }
}

TEST(ProjectionFidelityTest, AllParametersMse) {
  const TinyStore store = MakeTinyStore("all", "mse", "");
  const FidelityOptions options = SmallOptions();
  std::printf("image seed %llu, store seed 5, request seed %llu\n",
              static_cast<unsigned long long>(kImageSeed),
              static_cast<unsigned long long>(options.request_seed));
  // 14 images: only the first 12 are used.
  const at::Tensor train = RandomImages(14, kImageSeed);
  const at::Tensor queries = RandomImages(3, kImageSeed + 1);
  auto result = MeasureProjectionFidelity(store.description, store.manifest,
                                          train, queries, options);
  ASSERT_TRUE(result.ok()) << result.status();
  Print(*result);
  EXPECT_EQ(result->train_samples, 12);
  EXPECT_EQ(result->queries, 3);
  EXPECT_EQ(result->parameters, store.manifest.spec.projection.input_dim);
  ExpectSound(*result, options);
}

TEST(ProjectionFidelityTest, SelectedParametersL1) {
  const TinyStore store = MakeTinyStore("norm", "l1", "up\\..*");
  FidelityOptions options = SmallOptions();
  options.dims = {4096};
  options.query_timesteps = 1;
  options.noise_draws = 3;
  const at::Tensor train = RandomImages(12, kImageSeed + 2);
  const at::Tensor queries = RandomImages(2, kImageSeed + 3);
  auto result = MeasureProjectionFidelity(store.description, store.manifest,
                                          train, queries, options);
  ASSERT_TRUE(result.ok()) << result.status();
  Print(*result);
  // The decoder only: fewer than all parameters.
  auto net = run::LoadCheckpointModel(store.description, 0);
  ASSERT_TRUE(net.ok()) << net.status();
  int64_t all = 0, up = 0;
  for (const model::NamedParameter& param : (*net)->NamedParameters()) {
    all += param.tensor.numel();
    if (param.name.rfind("up.", 0) == 0) up += param.tensor.numel();
  }
  EXPECT_EQ(result->parameters, up);
  EXPECT_LT(up, all);
  ExpectSound(*result, options);
}

TEST(ProjectionFidelityTest, RefusesBadInputs) {
  TinyStore store = MakeTinyStore("bad", "mse", "");
  const at::Tensor train = RandomImages(4, kImageSeed);
  const at::Tensor queries = RandomImages(1, kImageSeed + 1);
  auto code = [&](const store::Manifest& manifest, const at::Tensor& images,
                  const FidelityOptions& options) {
    return MeasureProjectionFidelity(store.description, manifest, images,
                                     queries, options)
        .status()
        .code();
  };
  FidelityOptions options = SmallOptions();
  options.dims = {};
  EXPECT_EQ(code(store.manifest, train, options),
            absl::StatusCode::kInvalidArgument);
  options = SmallOptions();
  options.dims = {0};
  EXPECT_EQ(code(store.manifest, train, options),
            absl::StatusCode::kInvalidArgument);
  options = SmallOptions();  // top_k 3 of the 2 samples used
  options.train_samples = 2;
  EXPECT_EQ(code(store.manifest, train, options),
            absl::StatusCode::kInvalidArgument);
  options = SmallOptions();
  EXPECT_EQ(code(store.manifest, RandomImages(4, 1).narrow(3, 0, 4), options),
            absl::StatusCode::kInvalidArgument);
  store::Manifest other = store.manifest;
  other.spec.model.checkpoints[1].sha256 = std::string(64, '0');
  EXPECT_EQ(code(other, train, options), absl::StatusCode::kFailedPrecondition);
  other = store.manifest;
  other.spec.dataset.erase("store_seed");
  EXPECT_EQ(code(other, train, options), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace retrace::eval

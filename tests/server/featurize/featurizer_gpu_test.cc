// The featurizer on a CUDA device against its CPU twin: the same UNet
// (same seed), the same images and seeds, features computed once with the
// model on the CPU and once on the GPU. Labelled gpu; skips (with the reason)
// where LibTorch has no CUDA or no device is present.
//
// Tolerances. Both runs draw (t, ε) on the host (bit-identical) and project
// on the host with the same fixed-point projector, so they differ only by
// the float32 rounding of the forward and backward passes: cuDNN and cuBLAS
// sum in other orders than oneDNN and OpenBLAS (and pick other convolution
// algorithms), as the layerwise and loop engines do on the CPU, whose
// agreement is within 2e-5·max|g| per gradient coordinate and 1e-5 in norm
// (docs/featurization.md). The GPU adds its own algorithms' rounding over a
// whole network, so the bounds here are five to ten times those: 1e-4
// relative for norms, 1e-4 absolute for unit-vector coordinates (vectors of
// norm ≤ 1), 1e-4·max|q_raw| for q_raw. TF32 is off (ResolveDevice), which
// would otherwise alone cost about 1e-3.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "server/featurize/featurizer.h"
#include "server/featurize/group_gradients.h"
#include "server/model/device.h"
#include "server/model/unet.h"

namespace retrace::featurize {
namespace {

constexpr double kNormRelTol = 1e-4;
constexpr double kUnitAbsTol = 1e-4;
constexpr double kRawRelTol = 1e-4;

// Empty when CUDA is usable, else why not.
std::string CudaMissing() {
  absl::StatusOr<model::DeviceChoice> cuda =
      model::ResolveDevice(model::DeviceChoice::kCuda);
  return cuda.ok() ? "" : std::string(cuda.status().message());
}

model::UNetConfig SmallConfig() {
  model::UNetConfig config;
  config.base_channels = 8;
  config.channel_mults = {1, 2};
  config.norm_groups = 4;
  config.image_size = 16;
  return config;
}

FeaturizeSpec Spec(int64_t grad_timesteps) {
  FeaturizeSpec spec;
  spec.bucket_edges = {0, 100, 400, 1000};
  spec.grad_timesteps = grad_timesteps;
  spec.store_seed = 0x5eed;
  spec.projection.output_dim = 64;
  spec.projection.sparsity = 3;
  spec.projection.seed = 21;
  return spec;
}

// A CPU model and a CUDA model with the same weights, and their featurizers.
struct Twins {
  std::unique_ptr<model::UNetModel> cpu_model, gpu_model;
  std::unique_ptr<Featurizer> cpu, gpu;
};

Twins MakeTwins(const FeaturizeSpec& spec, GradientMethod method) {
  Twins t;
  const model::NoiseSchedule schedule = *model::NoiseSchedule::Create();
  t.cpu_model = *model::UNetModel::Create(SmallConfig(), 17);
  t.gpu_model = *model::UNetModel::Create(SmallConfig(), 17);
  absl::Status moved =
      model::MoveModelTo(*t.gpu_model, model::DeviceChoice::kCuda);
  EXPECT_TRUE(moved.ok()) << moved;
  EXPECT_TRUE(t.gpu_model->device().is_cuda());
  FeaturizeOptions options;
  options.method = method;
  options.max_rows = 16;
  auto cpu = Featurizer::Create(t.cpu_model.get(), schedule, spec, options);
  auto gpu = Featurizer::Create(t.gpu_model.get(), schedule, spec, options);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (cpu.ok()) t.cpu = *std::move(cpu);
  if (gpu.ok()) t.gpu = *std::move(gpu);
  return t;
}

at::Tensor Images(int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::rand({n, 1, 16, 16}, gen) * 2 - 1;
}

// max |a − b| / scale, printed with the name so a run shows the margin.
void ExpectClose(const std::string& what, const at::Tensor& cpu,
                 const at::Tensor& gpu, double tol, double scale) {
  ASSERT_TRUE(gpu.device().is_cpu()) << what << ": outputs are host tensors";
  ASSERT_EQ(cpu.sizes(), gpu.sizes()) << what;
  const double diff =
      (cpu.to(at::kDouble) - gpu.to(at::kDouble)).abs().max().item<double>();
  std::printf("%s: max |cpu - cuda| = %.3g (bound %.3g)\n", what.c_str(), diff,
              tol * scale);
  EXPECT_LE(diff, tol * scale) << what;
}

void CheckTrainingSide(GradientMethod method, int64_t m, bool replay) {
  SCOPED_TRACE(testing::Message() << "method=" << GradientMethodName(method)
                                  << " m=" << m << " replay=" << replay);
  Twins t = MakeTwins(Spec(m), method);
  ASSERT_TRUE(t.cpu && t.gpu);
  EXPECT_EQ(t.cpu->method(), t.gpu->method());
  const at::Tensor images = Images(6, 3);
  ReplayDraws draws;
  draws.timesteps =
      at::tensor(std::vector<int64_t>{1, 50, 200, 500, 800, 999}, at::kLong);
  at::Generator gen = at::detail::createCPUGenerator(4);
  draws.noise = at::randn({6, 1, 16, 16}, gen);
  auto cpu = t.cpu->TrainingSide(images, 10, 2, replay ? &draws : nullptr);
  auto gpu = t.gpu->TrainingSide(images, 10, 2, replay ? &draws : nullptr);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_TRUE(at::equal(cpu->timesteps, gpu->timesteps));
  const at::Tensor rel =
      (cpu->norms.to(at::kDouble) - gpu->norms.to(at::kDouble)).abs() /
      cpu->norms.to(at::kDouble).clamp_min(1e-30);
  std::printf("norms: max relative |cpu - cuda| = %.3g (bound %.3g)\n",
              rel.max().item<double>(), kNormRelTol);
  EXPECT_LE(rel.max().item<double>(), kNormRelTol);
  ExpectClose("training unit vectors", cpu->unit, gpu->unit, kUnitAbsTol, 1.0);
}

TEST(FeaturizerGpuTest, TrainingSideLayerwiseMatchesCpu) {
  if (const std::string why = CudaMissing(); !why.empty()) GTEST_SKIP() << why;
  CheckTrainingSide(GradientMethod::kLayerwise, 1, /*replay=*/true);
  CheckTrainingSide(GradientMethod::kLayerwise, 3, /*replay=*/false);
}

TEST(FeaturizerGpuTest, TrainingSideLoopMatchesCpu) {
  if (const std::string why = CudaMissing(); !why.empty()) GTEST_SKIP() << why;
  CheckTrainingSide(GradientMethod::kLoop, 2, /*replay=*/true);
}

TEST(FeaturizerGpuTest, QuerySideMatchesCpu) {
  if (const std::string why = CudaMissing(); !why.empty()) GTEST_SKIP() << why;
  Twins t = MakeTwins(Spec(1), GradientMethod::kAuto);
  ASSERT_TRUE(t.cpu && t.gpu);
  EXPECT_EQ(t.gpu->method(), GradientMethod::kLayerwise);
  QueryOptions query;
  query.query_timesteps = 2;
  query.noise_draws = 3;
  query.seed = 99;
  const at::Tensor image = Images(1, 8)[0];
  auto cpu = t.cpu->QuerySide(image, 1, query);
  auto gpu = t.gpu->QuerySide(image, 1, query);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_TRUE(at::equal(cpu->timesteps, gpu->timesteps));
  ExpectClose("query unit vectors", cpu->unit, gpu->unit, kUnitAbsTol, 1.0);
  ExpectClose("query raw vectors", cpu->raw, gpu->raw, kRawRelTol,
              cpu->raw.abs().max().item<double>());
}

// The same call twice on the GPU gives the same bits (deterministic cuDNN).
TEST(FeaturizerGpuTest, RepeatsBitForBit) {
  if (const std::string why = CudaMissing(); !why.empty()) GTEST_SKIP() << why;
  Twins t = MakeTwins(Spec(2), GradientMethod::kAuto);
  ASSERT_TRUE(t.gpu);
  const at::Tensor images = Images(4, 12);
  auto a = t.gpu->TrainingSide(images, 0, 0);
  auto b = t.gpu->TrainingSide(images, 0, 0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(at::equal(a->unit, b->unit));
  EXPECT_TRUE(at::equal(a->norms, b->norms));
}

TEST(FeaturizerGpuTest, ParallelEngineIsCpuOnly) {
  if (const std::string why = CudaMissing(); !why.empty()) GTEST_SKIP() << why;
  auto net = *model::UNetModel::Create(SmallConfig(), 5);
  ASSERT_TRUE(model::MoveModelTo(*net, model::DeviceChoice::kCuda).ok());
  FeaturizeOptions options;
  options.method = GradientMethod::kParallel;
  options.gradient_workers = 2;
  auto f = Featurizer::Create(net.get(), *model::NoiseSchedule::Create(),
                              Spec(1), options);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kFailedPrecondition)
      << f.status();
}

}  // namespace
}  // namespace retrace::featurize

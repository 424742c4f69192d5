// The parallel per-sample gradient engine against the loop on TorchScript
// models: the same group gradients bit for bit (the loop runs on one
// intra-op thread, as each worker does), for per-sample and grouped rows,
// worker counts that do not divide the groups and more workers than groups;
// checkpoints loaded into the original between calls; which engine kAuto
// picks; errors raised on a worker.
//
// The TorchScript models are written here with LibTorch's own TorchScript
// compiler (Module::define), so the test needs no Python.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "server/featurize/featurizer.h"
#include "server/featurize/group_gradients.h"
#include "server/model/torchscript_model.h"
#include "server/model/unet.h"

namespace retrace::featurize {
namespace {

using model::LossType;
using model::NoiseSchedule;

// Workers compute what the loop computes, operator for operator, on one
// intra-op thread: nothing is allowed to differ when the loop also runs on
// one thread. With more intra-op threads for the loop, reductions may split
// differently: |a − b| <= kThreadedRelTol · max|g| of the row.
constexpr double kThreadedRelTol = 1e-5;

constexpr int64_t kChannels = 2;
constexpr int64_t kSize = 6;

// A small noise-prediction network: sinusoidal time embedding, a linear
// layer, two 3×3 convolutions with GroupNorm and SiLU between them.
constexpr char kForward[] = R"JIT(
def forward(self, x_t, t):
    args = t.float().unsqueeze(1) * self.freqs.unsqueeze(0)
    temb = torch.linear(torch.cat([torch.sin(args), torch.cos(args)], 1),
                        self.time_w, self.time_b)
    h = torch.conv2d(x_t, self.conv1_w, self.conv1_b, [1, 1], [1, 1])
    h = h + temb.unsqueeze(-1).unsqueeze(-1)
    h = torch.silu(torch.group_norm(h, 2, self.norm_w, self.norm_b))
    return torch.conv2d(h, self.conv2_w, self.conv2_b, [1, 1], [1, 1])
)JIT";

// Saves a scripted model with weights drawn from `seed`; returns its path.
std::string WriteScriptedModel(uint64_t seed, const std::string& tag) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  // Parameters require gradients, as nn.Parameter's do.
  auto w = [&](std::vector<int64_t> shape) {
    return (at::randn(shape, gen) * 0.3).requires_grad_();
  };
  torch::jit::Module module("TinyEps");
  module.register_buffer("freqs",
                         at::exp(at::arange(4, at::kFloat) * (-6.9 / 4)));
  module.register_parameter("time_w", w({4, 8}), false);
  module.register_parameter("time_b", w({4}), false);
  module.register_parameter("conv1_w", w({4, kChannels, 3, 3}), false);
  module.register_parameter("conv1_b", w({4}), false);
  module.register_parameter("norm_w", (1 + w({4})).detach().requires_grad_(),
                            false);
  module.register_parameter("norm_b", w({4}), false);
  module.register_parameter("conv2_w", w({kChannels, 4, 3, 3}), false);
  module.register_parameter("conv2_b", w({kChannels}), false);
  module.define(kForward);
  const std::string path = testing::TempDir() + "/parallel_gradients_" + tag +
                           "_" + std::to_string(::getpid()) + ".pt";
  module.save(path);
  return path;
}

std::unique_ptr<model::TorchScriptModel> LoadScripted(const std::string& path) {
  auto model = model::TorchScriptModel::Create(
      path, model::ImageShape{kChannels, kSize, kSize});
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

struct Rows {
  at::Tensor x, t, eps;
};

Rows MakeRows(int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  Rows r;
  r.x = at::rand({n, kChannels, kSize, kSize}, gen) * 2 - 1;
  r.eps = at::randn(r.x.sizes(), gen);
  r.t = at::randint(0, 1000, {n}, gen, at::kLong);
  return r;
}

std::vector<int> AllIndices(const model::DiffusionModel& model) {
  std::vector<int> out(model.NamedParameters().size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int>(i);
  return out;
}

// Runs the loop engine with one LibTorch intra-op thread.
std::vector<at::Tensor> LoopOnOneThread(model::DiffusionModel* model,
                                        const Rows& rows, int64_t k,
                                        LossType loss = LossType::kMse) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  auto loop = internal::CreateGroupGradientEngine(
      model, *NoiseSchedule::Create(), loss, AllIndices(*model),
      GradientMethod::kLoop);
  EXPECT_TRUE(loop.ok()) << loop.status();
  auto grads = (*loop)->Compute(rows.x, rows.t, rows.eps, k);
  at::set_num_threads(threads);
  EXPECT_TRUE(grads.ok()) << grads.status();
  return grads.ok() ? *grads : std::vector<at::Tensor>{};
}

void ExpectIdentical(const std::vector<at::Tensor>& got,
                     const std::vector<at::Tensor>& want,
                     const model::DiffusionModel& model) {
  const std::vector<model::NamedParameter> params = model.NamedParameters();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(params[i].name);
    ASSERT_EQ(got[i].sizes().vec(), want[i].sizes().vec());
    EXPECT_TRUE(at::equal(got[i], want[i]))
        << "max |diff| " << (got[i] - want[i]).abs().max().item<double>();
  }
}

struct Split {
  int64_t rows;
  int64_t k;
  int workers;
};

class ParallelGradientsTest : public testing::TestWithParam<Split> {};

TEST_P(ParallelGradientsTest, EqualsTheLoopBitForBit) {
  const Split split = GetParam();
  SCOPED_TRACE(testing::Message()
               << "rows=" << split.rows << " k=" << split.k
               << " workers=" << split.workers << " seed=5,7");
  auto model = LoadScripted(WriteScriptedModel(5, "split"));
  ASSERT_NE(model, nullptr);
  const Rows rows = MakeRows(split.rows, 7);
  for (LossType loss : {LossType::kMse, LossType::kL1}) {
    SCOPED_TRACE(model::LossTypeName(loss));
    auto parallel = internal::CreateGroupGradientEngine(
        model.get(), *NoiseSchedule::Create(), loss, AllIndices(*model),
        GradientMethod::kParallel, split.workers);
    ASSERT_TRUE(parallel.ok()) << parallel.status();
    EXPECT_EQ((*parallel)->method(), GradientMethod::kParallel);
    EXPECT_EQ((*parallel)->workers(), split.workers);
    auto got = (*parallel)->Compute(rows.x, rows.t, rows.eps, split.k);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->front().size(0), split.rows / split.k);
    ExpectIdentical(*got, LoopOnOneThread(model.get(), rows, split.k, loss),
                    *model);
    // And again: the second call is the first one's bytes.
    auto again = (*parallel)->Compute(rows.x, rows.t, rows.eps, split.k);
    ASSERT_TRUE(again.ok()) << again.status();
    ExpectIdentical(*again, *got, *model);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Splits, ParallelGradientsTest,
    testing::Values(Split{7, 1, 2},    // per sample, 4 + 3 groups
                    Split{8, 1, 3},    // 2 + 3 + 3
                    Split{15, 3, 2},   // groups of 3: 2 + 3 groups
                    Split{12, 4, 4},   // groups of 4, more workers than groups
                    Split{4, 2, 1},    // one worker
                    Split{1, 1, 2}));  // one row

// With the loop on several intra-op threads, the two agree to float rounding.
TEST(ParallelGradientsOtherTest, MatchesAThreadedLoopWithinRounding) {
  auto model = LoadScripted(WriteScriptedModel(13, "threaded"));
  ASSERT_NE(model, nullptr);
  const Rows rows = MakeRows(6, 17);
  const NoiseSchedule schedule = *NoiseSchedule::Create();
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  auto loop = internal::CreateGroupGradientEngine(
      model.get(), schedule, LossType::kMse, AllIndices(*model),
      GradientMethod::kLoop);
  ASSERT_TRUE(loop.ok());
  auto want = (*loop)->Compute(rows.x, rows.t, rows.eps, 2);
  at::set_num_threads(threads);
  auto parallel = internal::CreateGroupGradientEngine(
      model.get(), schedule, LossType::kMse, AllIndices(*model),
      GradientMethod::kParallel, 2);
  ASSERT_TRUE(parallel.ok() && want.ok());
  auto got = (*parallel)->Compute(rows.x, rows.t, rows.eps, 2);
  ASSERT_TRUE(got.ok()) << got.status();
  for (size_t i = 0; i < got->size(); ++i) {
    const double scale = (*want)[i].abs().max().item<double>();
    EXPECT_LE(((*got)[i] - (*want)[i]).abs().max().item<double>(),
              kThreadedRelTol * scale + 1e-12)
        << model->NamedParameters()[i].name;
  }
}

// The caller's checkpoint loop: one engine, the original model loading θ_c
// in between, gives what the loop gives on the loaded model.
TEST(ParallelGradientsOtherTest, FollowsLoadsIntoTheOriginal) {
  auto model = LoadScripted(WriteScriptedModel(19, "first"));
  ASSERT_NE(model, nullptr);
  const std::string other = WriteScriptedModel(23, "second");
  const Rows rows = MakeRows(5, 29);
  auto parallel = internal::CreateGroupGradientEngine(
      model.get(), *NoiseSchedule::Create(), LossType::kMse, AllIndices(*model),
      GradientMethod::kParallel, 2);
  ASSERT_TRUE(parallel.ok()) << parallel.status();
  auto first = (*parallel)->Compute(rows.x, rows.t, rows.eps, 1);
  ASSERT_TRUE(first.ok()) << first.status();
  ExpectIdentical(*first, LoopOnOneThread(model.get(), rows, 1), *model);

  ASSERT_TRUE(model->Load(other).ok());
  auto second = (*parallel)->Compute(rows.x, rows.t, rows.eps, 1);
  ASSERT_TRUE(second.ok()) << second.status();
  ExpectIdentical(*second, LoopOnOneThread(model.get(), rows, 1), *model);
  EXPECT_FALSE(at::equal(first->front(), second->front()));
}

TEST(ParallelGradientsOtherTest, AutoPicksParallelForTorchScriptOnly) {
  auto model = LoadScripted(WriteScriptedModel(31, "auto"));
  ASSERT_NE(model, nullptr);
  const NoiseSchedule schedule = *NoiseSchedule::Create();
  auto pick = [&](model::DiffusionModel* m, GradientMethod method,
                  int workers) {
    return internal::CreateGroupGradientEngine(m, schedule, LossType::kMse,
                                               AllIndices(*m), method, workers);
  };
  auto two = pick(model.get(), GradientMethod::kAuto, 2);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ((*two)->method(), GradientMethod::kParallel);
  EXPECT_EQ((*two)->workers(), 2);
  // One worker would be the loop with extra copies.
  auto one = pick(model.get(), GradientMethod::kAuto, 1);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ((*one)->method(), GradientMethod::kLoop);
  // 0: one per hardware thread.
  auto all = pick(model.get(), GradientMethod::kParallel, 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ((*all)->workers(),
            std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
  EXPECT_EQ(pick(model.get(), GradientMethod::kParallel, -1).status().code(),
            absl::StatusCode::kInvalidArgument);

  // The built-in UNet keeps the layerwise engine; it has no replicas, so
  // kParallel is refused naming what is missing.
  model::UNetConfig config;
  config.base_channels = 4;
  config.channel_mults = {1, 2};
  config.norm_groups = 2;
  config.image_size = 8;
  auto unet = model::UNetModel::Create(config, 3);
  ASSERT_TRUE(unet.ok());
  auto layerwise = pick(unet->get(), GradientMethod::kAuto, 2);
  ASSERT_TRUE(layerwise.ok());
  EXPECT_EQ((*layerwise)->method(), GradientMethod::kLayerwise);
  auto refused = pick(unet->get(), GradientMethod::kParallel, 2);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("replicas"), std::string::npos)
      << refused.status();
  EXPECT_STREQ(GradientMethodName(GradientMethod::kParallel), "parallel");
}

// An error on a worker (here a timestep outside the schedule) comes back as
// the call's status; the engine still works afterwards.
TEST(ParallelGradientsOtherTest, ReportsAWorkersError) {
  auto model = LoadScripted(WriteScriptedModel(37, "error"));
  ASSERT_NE(model, nullptr);
  auto parallel = internal::CreateGroupGradientEngine(
      model.get(), *NoiseSchedule::Create(), LossType::kMse, AllIndices(*model),
      GradientMethod::kParallel, 2);
  ASSERT_TRUE(parallel.ok()) << parallel.status();
  Rows rows = MakeRows(4, 41);
  Rows bad = rows;
  bad.t = rows.t.clone();
  bad.t[3] = 5000;  // in the second worker's share
  auto failed = (*parallel)->Compute(bad.x, bad.t, bad.eps, 1);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument)
      << failed.status();
  auto fine = (*parallel)->Compute(rows.x, rows.t, rows.eps, 1);
  ASSERT_TRUE(fine.ok()) << fine.status();
  ExpectIdentical(*fine, LoopOnOneThread(model.get(), rows, 1), *model);
}

// Through the featurizer: training and query sides of the parallel engine
// are the loop's bytes.
TEST(ParallelGradientsOtherTest, FeaturizerSidesEqualTheLoops) {
  auto model = LoadScripted(WriteScriptedModel(43, "featurizer"));
  ASSERT_NE(model, nullptr);
  const NoiseSchedule schedule = *NoiseSchedule::Create();
  FeaturizeSpec spec;
  spec.bucket_edges = {0, 300, 1000};
  spec.grad_timesteps = 3;
  spec.store_seed = 0x5eed;
  spec.projection.output_dim = 16;
  spec.projection.sparsity = 2;
  spec.projection.seed = 3;
  FeaturizeOptions parallel_options;
  parallel_options.max_rows = 9;  // several passes, three groups each
  parallel_options.method = GradientMethod::kParallel;
  parallel_options.gradient_workers = 2;
  auto parallel =
      Featurizer::Create(model.get(), schedule, spec, parallel_options);
  ASSERT_TRUE(parallel.ok()) << parallel.status();
  EXPECT_EQ((*parallel)->method(), GradientMethod::kParallel);
  EXPECT_EQ((*parallel)->gradient_workers(), 2);
  const Rows rows = MakeRows(5, 47);
  auto got = (*parallel)->TrainingSide(rows.x, 11, 0);
  QueryOptions query;
  query.noise_draws = 3;
  auto got_query = (*parallel)->QuerySide(rows.x[0], 0, query);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got_query.ok()) << got_query.status();

  FeaturizeOptions loop_options = parallel_options;
  loop_options.method = GradientMethod::kLoop;
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  auto loop = Featurizer::Create(model.get(), schedule, spec, loop_options);
  ASSERT_TRUE(loop.ok()) << loop.status();
  auto want = (*loop)->TrainingSide(rows.x, 11, 0);
  auto want_query = (*loop)->QuerySide(rows.x[0], 0, query);
  at::set_num_threads(threads);
  ASSERT_TRUE(want.ok() && want_query.ok());
  EXPECT_TRUE(at::equal(got->norms, want->norms));
  EXPECT_TRUE(at::equal(got->unit, want->unit));
  EXPECT_TRUE(at::equal(got_query->raw, want_query->raw));
  EXPECT_TRUE(at::equal(got_query->unit, want_query->unit));
}

}  // namespace
}  // namespace retrace::featurize

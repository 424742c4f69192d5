// The built-in UNet and the LibTorch forms of noising and loss.
#include "server/model/unet.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/types.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>

#include "server/model/diffusion.h"

namespace retrace::model {
namespace {

constexpr uint64_t kSeed = 7;
constexpr int64_t kMinParams = 200'000;
constexpr int64_t kMaxParams = 1'000'000;

std::unique_ptr<UNetModel> MakeUNet(uint64_t seed = kSeed,
                                    const UNetConfig& config = {}) {
  auto model = UNetModel::Create(config, seed);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

// Fixed inputs from a seeded generator.
struct Batch {
  torch::Tensor x, eps, t;
};
Batch MakeBatch(int64_t batch, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  Batch b;
  b.x = at::rand({batch, 1, 28, 28}, gen) * 2 - 1;
  b.eps = at::randn({batch, 1, 28, 28}, gen);
  b.t = at::randint(0, 1000, {batch}, gen, torch::kLong);
  return b;
}

TEST(UNetTest, OutputShapeAndParameterCount) {
  auto model = MakeUNet();
  Batch b = MakeBatch(4, 1);
  auto eps = model->Forward(b.x, b.t);
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_EQ(eps->sizes().vec(), (std::vector<int64_t>{4, 1, 28, 28}));
  EXPECT_EQ(eps->scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::isfinite(*eps).all().item<bool>());
  const int64_t params = CountParameters(*model);
  std::printf("unet default config: %lld parameters\n",
              static_cast<long long>(params));
  EXPECT_GE(params, kMinParams);
  EXPECT_LE(params, kMaxParams);
  EXPECT_EQ(model->Architecture(), "unet");
  EXPECT_EQ(model->InputShape().height, 28);
}

TEST(UNetTest, ParameterNamesAreStableAndDocumented) {
  auto model = MakeUNet();
  std::vector<NamedParameter> params = model->NamedParameters();
  ASSERT_FALSE(params.empty());
  std::set<std::string> names;
  for (const NamedParameter& p : params) {
    EXPECT_TRUE(names.insert(p.name).second) << "duplicate " << p.name;
    EXPECT_TRUE(p.tensor.requires_grad()) << p.name;
  }
  EXPECT_EQ(params.front().name, "time_embed.linear1.weight");
  EXPECT_EQ(params.back().name, "out_conv.bias");
  for (const char* name :
       {"conv_in.weight", "down.0.res.conv1.weight", "down.1.res.skip.weight",
        "down.0.downsample.weight", "down.2.attn.qkv.weight",
        "mid.res1.time_proj.weight", "mid.attn.proj.bias",
        "mid.res2.norm2.bias", "up.0.res.skip.weight", "up.2.attn.norm.weight",
        "up.1.upsample.weight", "out_norm.weight"}) {
    EXPECT_TRUE(names.count(name)) << "missing " << name;
  }
  EXPECT_FALSE(names.count("down.2.downsample.weight"));
  EXPECT_FALSE(names.count("up.0.upsample.weight"));
  // A second instance lists the same names in the same order.
  auto other = MakeUNet(kSeed + 1);
  std::vector<NamedParameter> other_params = other->NamedParameters();
  ASSERT_EQ(other_params.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(other_params[i].name, params[i].name);
  }
}

TEST(UNetTest, DeterministicFromSeed) {
  auto a = MakeUNet(kSeed), b = MakeUNet(kSeed), c = MakeUNet(kSeed + 1);
  auto pa = a->NamedParameters(), pb = b->NamedParameters(),
       pc = c->NamedParameters();
  bool any_differs = false;
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i].tensor, pb[i].tensor)) << pa[i].name;
    any_differs = any_differs || !torch::equal(pa[i].tensor, pc[i].tensor);
  }
  EXPECT_TRUE(any_differs);
  Batch batch = MakeBatch(2, 3);
  EXPECT_TRUE(torch::equal(*a->Forward(batch.x, batch.t),
                           *b->Forward(batch.x, batch.t)));
}

TEST(UNetTest, GradientsReachEveryParameter) {
  for (bool attention : {true, false}) {
    SCOPED_TRACE(testing::Message() << "attention=" << attention);
    UNetConfig config;
    config.attention = attention;
    auto model = MakeUNet(kSeed, config);
    model->SetTraining(true);
    auto schedule = NoiseSchedule::Create().value();
    Batch b = MakeBatch(4, 5);
    auto loss =
        DiffusionLoss(*model, schedule, LossType::kMse, b.x, b.t, b.eps);
    ASSERT_TRUE(loss.ok()) << loss.status();
    ASSERT_EQ(loss->sizes().vec(), std::vector<int64_t>{4});
    loss->sum().backward();
    for (const NamedParameter& p : model->NamedParameters()) {
      ASSERT_TRUE(p.tensor.grad().defined()) << p.name;
      EXPECT_TRUE(torch::isfinite(p.tensor.grad()).all().item<bool>())
          << p.name;
      EXPECT_GT(p.tensor.grad().abs().max().item<float>(), 0.0f) << p.name;
    }
  }
}

TEST(UNetTest, SmallerAndLargerConfigs) {
  UNetConfig config;
  config.base_channels = 8;
  config.norm_groups = 4;
  config.channel_mults = {1, 2};
  auto model = MakeUNet(kSeed, config);
  Batch b = MakeBatch(2, 9);
  auto eps = model->Forward(b.x, b.t);
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_EQ(eps->sizes().vec(), (std::vector<int64_t>{2, 1, 28, 28}));
}

TEST(UNetTest, RejectsBadConfigAndInputs) {
  UNetConfig config;
  config.norm_groups = 5;
  EXPECT_EQ(UNetModel::Create(config, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  config = UNetConfig{};
  config.channel_mults = {1, 2, 2, 2};  // 28 is not divisible by 8
  EXPECT_EQ(UNetModel::Create(config, 0).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto model = MakeUNet();
  torch::Tensor t = torch::zeros({2}, torch::kLong);
  EXPECT_EQ(model->Forward(torch::zeros({2, 1, 32, 32}), t).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->Forward(torch::zeros({2, 1, 28, 28}), torch::zeros({2}))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model
                ->Forward(torch::zeros({2, 1, 28, 28}),
                          torch::zeros({3}, torch::kLong))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(UNetTest, SaveLoadRoundTrip) {
  const std::string path = testing::TempDir() + "/unet_roundtrip.pt";
  auto a = MakeUNet(1);
  ASSERT_TRUE(a->Save(path).ok());
  auto b = MakeUNet(2);
  ASSERT_TRUE(b->Load(path).ok());
  auto pa = a->NamedParameters(), pb = b->NamedParameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i].tensor, pb[i].tensor)) << pa[i].name;
  }

  absl::Status missing = b->Load(path + ".missing");
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("unet_roundtrip.pt.missing"),
            std::string::npos);

  UNetConfig other;
  other.attention = false;
  auto c = MakeUNet(1, other);
  absl::Status mismatch = c->Load(path);
  EXPECT_EQ(mismatch.code(), absl::StatusCode::kInvalidArgument) << mismatch;
  EXPECT_NE(mismatch.message().find(path), std::string::npos);
}

TEST(DiffusionTest, AddNoiseMatchesDoubleFormula) {
  for (ScheduleType type : {ScheduleType::kCosine, ScheduleType::kLinear}) {
    auto schedule = NoiseSchedule::Create(type).value();
    Batch b = MakeBatch(5, 11);
    auto x_t = AddNoise(schedule, b.x, b.t, b.eps);
    ASSERT_TRUE(x_t.ok()) << x_t.status();
    auto xd = b.x.to(torch::kDouble), ed = b.eps.to(torch::kDouble);
    for (int64_t i = 0; i < 5; ++i) {
      const int t = static_cast<int>(b.t[i].item<int64_t>());
      const double abar = schedule.AlphaBar(t);
      auto expected = std::sqrt(abar) * xd[i] + std::sqrt(1 - abar) * ed[i];
      EXPECT_LT((x_t->select(0, i).to(torch::kDouble) - expected)
                    .abs()
                    .max()
                    .item<double>(),
                1e-6)
          << ScheduleTypeName(type) << " t=" << t;
    }
  }
  auto schedule = NoiseSchedule::Create().value();
  Batch b = MakeBatch(2, 1);
  EXPECT_EQ(AddNoise(schedule, b.x, torch::full({2}, 1000, torch::kLong), b.eps)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AddNoise(schedule, b.x, b.t, b.eps.select(0, 0)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DiffusionTest, PerExampleLossHandComputed) {
  // Row 0 differences 0.5, 0, -2, 1; row 1 all zero.
  torch::Tensor eps =
      torch::tensor({1.0f, 2.0f, -1.0f, 0.0f, 3.0f, 3.0f, 3.0f, 3.0f})
          .reshape({2, 1, 2, 2});
  torch::Tensor eps_hat =
      torch::tensor({0.5f, 2.0f, 1.0f, -1.0f, 3.0f, 3.0f, 3.0f, 3.0f})
          .reshape({2, 1, 2, 2});
  auto mse = PerExampleLoss(eps, eps_hat, LossType::kMse);
  auto l1 = PerExampleLoss(eps, eps_hat, LossType::kL1);
  ASSERT_TRUE(mse.ok() && l1.ok());
  EXPECT_FLOAT_EQ((*mse)[0].item<float>(), 5.25f / 4);
  EXPECT_FLOAT_EQ((*mse)[1].item<float>(), 0.0f);
  EXPECT_FLOAT_EQ((*l1)[0].item<float>(), 3.5f / 4);
  EXPECT_EQ(PerExampleLoss(eps, eps_hat.reshape({2, 4}), LossType::kMse)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// Not a pass/fail check: prints the cost of one training step, which the demo's
// time budget (docs/demo.md) depends on.
TEST(UNetTest, ReportsStepTime) {
  auto model = MakeUNet();
  model->SetTraining(true);
  auto schedule = NoiseSchedule::Create().value();
  Batch b = MakeBatch(64, 2);
  auto start = std::chrono::steady_clock::now();
  constexpr int kSteps = 3;
  for (int i = 0; i < kSteps; ++i) {
    auto loss =
        DiffusionLoss(*model, schedule, LossType::kMse, b.x, b.t, b.eps);
    ASSERT_TRUE(loss.ok());
    loss->mean().backward();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count() /
      kSteps;
  std::printf("unet forward+backward, batch 64, %d threads: %.3f s/step\n",
              at::get_num_threads(), seconds);
}

}  // namespace
}  // namespace retrace::model

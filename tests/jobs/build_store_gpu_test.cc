// A tiny store built with the per-sample gradients on a CUDA device against
// the same store built on the CPU. Labelled gpu; skips (with the reason)
// where LibTorch has no CUDA or no device is present.
//
// Tolerances as tests/server/featurize/featurizer_gpu_test.cc: the draws and
// the projection are the same on both devices, the gradients differ by
// float32 rounding only (1e-4 relative for norms, 1e-4 absolute per
// unit-vector coordinate); self-influence is a sum of products of those
// (1e-3 relative, floor 1e-6). The store is F32 so that storage rounding
// does not hide a difference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "jobs/build_store.h"
#include "kernels/dtype.h"
#include "server/model/device.h"
#include "server/store/store_reader.h"
#include "tests/jobs/tiny_run.h"

namespace retrace::jobs {
namespace {

constexpr double kNormRelTol = 1e-4;
constexpr double kUnitAbsTol = 1e-4;
constexpr double kSelfInfluenceRelTol = 1e-3;

TEST(BuildStoreGpuTest, CudaStoreMatchesCpuStore) {
  absl::StatusOr<model::DeviceChoice> cuda =
      model::ResolveDevice(model::DeviceChoice::kCuda);
  if (!cuda.ok()) GTEST_SKIP() << cuda.status().message();

  const testing::TinyRun run = testing::MakeTinyRun("gpu");
  StoreBuildConfig config;
  config.dim = 128;
  config.sparsity = 2;
  config.projection_seed = 11;
  config.store_seed = 5;
  config.grad_timesteps = 2;
  config.dtype = kernels::DType::kF32;
  auto build = [&](model::DeviceChoice device, const std::string& name) {
    StoreBuildOptions options;
    options.model_path = run.run_dir;
    options.out_dir = testing::FreshDir(name);
    options.dataset_name = data::FormatMixtureSpec(run.spec);
    options.dataset_seed = run.spec.seed;
    options.threads = testing::kTinyThreads;
    options.batch_rows = 8;
    options.device = device;
    auto result =
        BuildStore(config, run.mixture.images, run.mixture.sample_ids, options);
    EXPECT_TRUE(result.ok()) << result.status();
    if (result.ok()) {
      std::printf("%s: %.1f samples/s\n", model::DeviceChoiceName(device),
                  result->samples_per_second);
    }
    return options.out_dir;
  };
  const std::string cpu_dir = build(model::DeviceChoice::kCpu, "gpu-cpu");
  const std::string gpu_dir = build(model::DeviceChoice::kCuda, "gpu-cuda");

  auto cpu = store::StoreReader::Open(cpu_dir);
  auto gpu = store::StoreReader::Open(gpu_dir);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ASSERT_EQ((*cpu)->num_samples(), (*gpu)->num_samples());
  const int64_t C = (*cpu)->num_checkpoints(), S = (*cpu)->num_slots(),
                D = (*cpu)->dim();
  double worst_norm = 0, worst_unit = 0, worst_si = 0;
  for (int64_t n = 0; n < (*cpu)->num_samples(); ++n) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    auto a = (*cpu)->Sample(n);
    auto b = (*gpu)->Sample(n);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->sample_ids[0], b->sample_ids[0]);
    for (int64_t i = 0; i < C * S; ++i) {
      const double x = a->norms[i], y = b->norms[i];
      worst_norm =
          std::max(worst_norm, std::abs(x - y) / std::max(std::abs(x), 1e-30));
    }
    const float* u = static_cast<const float*>(a->vectors);
    const float* v = static_cast<const float*>(b->vectors);
    for (int64_t i = 0; i < C * S * D; ++i) {
      worst_unit = std::max(worst_unit, std::abs(double(u[i]) - v[i]));
    }
    for (int k = 0; k < 2; ++k) {
      const double x = a->self_influence[k], y = b->self_influence[k];
      worst_si =
          std::max(worst_si, std::abs(x - y) / std::max(std::abs(x), 1e-6));
    }
  }
  std::printf(
      "cpu vs cuda store: max relative norm diff %.3g, max unit diff %.3g, "
      "max relative self-influence diff %.3g\n",
      worst_norm, worst_unit, worst_si);
  EXPECT_LE(worst_norm, kNormRelTol);
  EXPECT_LE(worst_unit, kUnitAbsTol);
  EXPECT_LE(worst_si, kSelfInfluenceRelTol);
}

}  // namespace
}  // namespace retrace::jobs

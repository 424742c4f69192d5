// Featurization throughput on the built-in UNet (default config, ~0.5M
// parameters, 28×28) at one batch size B, all parameters selected.
//
//   featurize/loop          per-sample gradients, one backward pass each
//   featurize/layerwise     per-sample gradients in one batched pass
//   featurize/training_side Featurizer::TrainingSide for one bucket: the
//                           layerwise gradients plus RNG draws, full norms and
//                           the streamed SJLT projection (D = 1024, s = 4)
//   train/fwd_bwd           forward + backward of the mean loss over B
//   train/step              forward + backward + Adam step over B
//
// With a TorchScript model (the path in RETRACE_BENCH_TORCHSCRIPT; scripts/
// bench.sh exports examples/pytorch_ddpm/model.py's untrained 32×32 RGB UNet
// there) and B 32×32 RGB images, one bucket, all parameters selected:
//   featurize_ts/loop           Featurizer::TrainingSide, loop engine, with
//                               the LibTorch threads set below
//   featurize_ts/loop_1thread   the same on one intra-op thread (the loop's
//                               fastest setting for a model this small)
//   featurize_ts/parallel       Featurizer::TrainingSide, parallel engine,
//                               one worker per hardware thread
//   featurize_ts/grads_loop, featurize_ts/grads_parallel
//                               the per-sample gradients alone (no draws,
//                               norms or projection), loop on one thread
//   featurize_ts/query_loop, featurize_ts/query_parallel
//                               Featurizer::QuerySide of one image (10
//                               buckets × 2 timesteps × 4 draws = 20 groups
//                               of 4 rows), as the server runs it
//
// Each iteration handles B samples, so time ratios are throughput ratios:
//   RATIO featurize_vs_loop      loop / layerwise            (goal >= 3)
//   RATIO featurize_vs_training  train/step / training_side  (goal >= 0.3)
//   RATIO featurize_grads_vs_training  train/step / layerwise
//   RATIO featurize_vs_fwd_bwd   train/fwd_bwd / training_side (target:
//                                overhead beyond forward+backward <= 20%
//                                means >= 0.83)
//   RATIO torchscript_featurize_vs_loop          featurize_ts/loop / parallel
//   RATIO torchscript_featurize_vs_loop_1thread  loop_1thread / parallel
//   RATIO torchscript_grads_vs_loop              grads_loop / grads_parallel
//   RATIO torchscript_query_vs_loop              query_loop / query_parallel
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/optim/adam.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/ratio_reporter.h"
#include "common/allocator.h"
#include "kernels/device.h"
#include "server/featurize/featurizer.h"
#include "server/featurize/group_gradients.h"
#include "server/model/diffusion.h"
#include "server/model/torchscript_model.h"
#include "server/model/unet.h"

namespace retrace::featurize {
namespace {

constexpr int64_t kBatch = 64;
constexpr uint64_t kSeed = 1;

struct Fixture {
  std::unique_ptr<model::UNetModel> model;
  model::NoiseSchedule schedule = *model::NoiseSchedule::Create();
  at::Tensor x, t, eps;

  Fixture() {
    model = *model::UNetModel::Create(model::UNetConfig{}, kSeed);
    at::Generator gen = at::detail::createCPUGenerator(kSeed);
    x = at::rand({kBatch, 1, 28, 28}, gen) * 2 - 1;
    eps = at::randn({kBatch, 1, 28, 28}, gen);
    t = at::randint(0, 1000, {kBatch}, gen, at::kLong);
  }

  std::vector<int> AllParameters() const {
    std::vector<int> all(model->NamedParameters().size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
    return all;
  }
};

Fixture& Shared() {
  static Fixture* fixture = new Fixture();
  return *fixture;
}

void RunEngine(benchmark::State& state, GradientMethod method) {
  Fixture& f = Shared();
  auto engine = internal::CreateGroupGradientEngine(f.model.get(), f.schedule,
                                                    model::LossType::kMse,
                                                    f.AllParameters(), method);
  if (!engine.ok()) {
    state.SkipWithError(engine.status().ToString().c_str());
    return;
  }
  for (auto _ : state) {
    auto grads = (*engine)->Compute(f.x, f.t, f.eps, 1);
    if (!grads.ok()) {
      state.SkipWithError(grads.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(grads->front().data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void RunTrainingSide(benchmark::State& state) {
  Fixture& f = Shared();
  FeaturizeSpec spec;
  spec.bucket_edges = {0, f.schedule.num_timesteps()};  // one slot
  spec.projection.output_dim = 1024;
  spec.projection.sparsity = 4;
  FeaturizeOptions options;
  options.max_rows = kBatch;
  auto featurizer =
      Featurizer::Create(f.model.get(), f.schedule, spec, options);
  if (!featurizer.ok()) {
    state.SkipWithError(featurizer.status().ToString().c_str());
    return;
  }
  int64_t first = 0;
  for (auto _ : state) {
    auto features = (*featurizer)->TrainingSide(f.x, first, 0);
    if (!features.ok()) {
      state.SkipWithError(features.status().ToString().c_str());
      break;
    }
    first += kBatch;
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void RunTraining(benchmark::State& state, bool adam) {
  Fixture& f = Shared();
  std::vector<at::Tensor> params;
  for (const auto& p : f.model->NamedParameters()) params.push_back(p.tensor);
  torch::optim::Adam optimizer(params, torch::optim::AdamOptions(1e-4));
  // Adam steps change the shared model; keep its weights for the others.
  std::vector<at::Tensor> saved;
  for (const at::Tensor& p : params) saved.push_back(p.detach().clone());
  f.model->SetTraining(true);
  for (auto _ : state) {
    optimizer.zero_grad();
    auto per = model::DiffusionLoss(*f.model, f.schedule, model::LossType::kMse,
                                    f.x, f.t, f.eps);
    if (!per.ok()) {
      state.SkipWithError(per.status().ToString().c_str());
      break;
    }
    per->mean().backward();
    if (adam) optimizer.step();
  }
  f.model->SetTraining(false);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].copy_(saved[i]);
    params[i].mutable_grad() = at::Tensor();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

// ---- TorchScript ----

constexpr int64_t kTsBatch = 64;
constexpr char kTsModelEnv[] = "RETRACE_BENCH_TORCHSCRIPT";

struct TsFixture {
  std::string error;  // why the TorchScript benchmarks cannot run
  std::unique_ptr<model::TorchScriptModel> model;
  model::NoiseSchedule schedule = *model::NoiseSchedule::Create();
  at::Tensor x, t, eps;

  TsFixture() {
    const char* path = std::getenv(kTsModelEnv);
    if (path == nullptr || *path == '\0') {
      error = std::string(kTsModelEnv) +
              " is not set (scripts/bench.sh exports the example model)";
      return;
    }
    auto created =
        model::TorchScriptModel::Create(path, model::ImageShape{3, 32, 32});
    if (!created.ok()) {
      error = created.status().ToString();
      return;
    }
    model = *std::move(created);
    at::Generator gen = at::detail::createCPUGenerator(kSeed);
    x = at::rand({kTsBatch, 3, 32, 32}, gen) * 2 - 1;
    eps = at::randn({kTsBatch, 3, 32, 32}, gen);
    t = at::randint(0, 1000, {kTsBatch}, gen, at::kLong);
  }
};

TsFixture& SharedTs() {
  static TsFixture* fixture = new TsFixture();
  return *fixture;
}

// Sets LibTorch's intra-op threads for one benchmark and restores them.
class IntraOpThreads {
 public:
  explicit IntraOpThreads(int threads) : saved_(at::get_num_threads()) {
    if (threads > 0) at::set_num_threads(threads);
  }
  ~IntraOpThreads() { at::set_num_threads(saved_); }

 private:
  int saved_;
};

std::unique_ptr<Featurizer> TsFeaturizer(benchmark::State& state,
                                         GradientMethod method,
                                         int64_t buckets) {
  TsFixture& f = SharedTs();
  if (!f.error.empty()) {
    state.SkipWithError(f.error.c_str());
    return nullptr;
  }
  FeaturizeSpec spec;
  spec.bucket_edges.clear();
  for (int64_t b = 0; b <= buckets; ++b) {
    spec.bucket_edges.push_back(b * f.schedule.num_timesteps() / buckets);
  }
  spec.projection.output_dim = 1024;
  spec.projection.sparsity = 4;
  FeaturizeOptions options;
  options.max_rows = kTsBatch;
  options.method = method;  // gradient_workers 0: one per hardware thread
  auto featurizer =
      Featurizer::Create(f.model.get(), f.schedule, spec, options);
  if (!featurizer.ok()) {
    state.SkipWithError(featurizer.status().ToString().c_str());
    return nullptr;
  }
  state.counters["workers"] = (*featurizer)->gradient_workers();
  return *std::move(featurizer);
}

void RunTsTrainingSide(benchmark::State& state, GradientMethod method,
                       int intra_op_threads) {
  IntraOpThreads threads(intra_op_threads);
  std::unique_ptr<Featurizer> featurizer = TsFeaturizer(state, method, 1);
  if (featurizer == nullptr) return;
  TsFixture& f = SharedTs();
  int64_t first = 0;
  for (auto _ : state) {
    auto features = featurizer->TrainingSide(f.x, first, 0);
    if (!features.ok()) {
      state.SkipWithError(features.status().ToString().c_str());
      break;
    }
    first += kTsBatch;
  }
  state.SetItemsProcessed(state.iterations() * kTsBatch);
}

void RunTsGradients(benchmark::State& state, GradientMethod method) {
  IntraOpThreads threads(1);
  TsFixture& f = SharedTs();
  if (!f.error.empty()) {
    state.SkipWithError(f.error.c_str());
    return;
  }
  std::vector<int> all(f.model->NamedParameters().size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  auto engine = internal::CreateGroupGradientEngine(
      f.model.get(), f.schedule, model::LossType::kMse, all, method);
  if (!engine.ok()) {
    state.SkipWithError(engine.status().ToString().c_str());
    return;
  }
  state.counters["workers"] = (*engine)->workers();
  for (auto _ : state) {
    auto grads = (*engine)->Compute(f.x, f.t, f.eps, 1);
    if (!grads.ok()) {
      state.SkipWithError(grads.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(grads->front().data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * kTsBatch);
}

void RunTsQuerySide(benchmark::State& state, GradientMethod method) {
  std::unique_ptr<Featurizer> featurizer =
      TsFeaturizer(state, method, kDefaultNumBuckets);
  if (featurizer == nullptr) return;
  TsFixture& f = SharedTs();
  QueryOptions query;  // 2 timesteps × 4 draws per bucket
  for (auto _ : state) {
    auto features = featurizer->QuerySide(f.x[0], 0, query);
    if (!features.ok()) {
      state.SkipWithError(features.status().ToString().c_str());
      break;
    }
  }
  state.SetItemsProcessed(state.iterations());
}

}  // namespace
}  // namespace retrace::featurize

int main(int argc, char** argv) {
  retrace::KeepFreedMemoryForReuse();
  using namespace retrace::featurize;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // LibTorch's OpenMP pool may start with one thread; every variant runs
  // with the same count (RETRACE_CPU_THREADS overrides, as for the kernels).
  at::set_num_threads(retrace::kernels::CpuThreads());
  std::printf("# B = %lld, UNet default config, %d LibTorch threads\n",
              static_cast<long long>(kBatch), at::get_num_threads());
  auto reg = [](const char* name, auto fn) {
    benchmark::RegisterBenchmark(name, fn)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinTime(2.0);
  };
  reg("featurize/loop",
      [](benchmark::State& s) { RunEngine(s, GradientMethod::kLoop); });
  reg("featurize/layerwise",
      [](benchmark::State& s) { RunEngine(s, GradientMethod::kLayerwise); });
  reg("featurize/training_side", RunTrainingSide);
  reg("train/fwd_bwd", [](benchmark::State& s) { RunTraining(s, false); });
  reg("train/step", [](benchmark::State& s) { RunTraining(s, true); });
  if (SharedTs().error.empty()) {
    std::printf(
        "# TorchScript: %s, B = %lld 32x32 RGB images, %lld "
        "parameters, %u hardware threads\n",
        SharedTs().model->path().c_str(), static_cast<long long>(kTsBatch),
        static_cast<long long>(
            retrace::model::CountParameters(*SharedTs().model)),
        std::thread::hardware_concurrency());
    reg("featurize_ts/loop", [](benchmark::State& s) {
      RunTsTrainingSide(s, GradientMethod::kLoop, 0);
    });
    reg("featurize_ts/loop_1thread", [](benchmark::State& s) {
      RunTsTrainingSide(s, GradientMethod::kLoop, 1);
    });
    reg("featurize_ts/parallel", [](benchmark::State& s) {
      RunTsTrainingSide(s, GradientMethod::kParallel, 0);
    });
    reg("featurize_ts/grads_loop",
        [](benchmark::State& s) { RunTsGradients(s, GradientMethod::kLoop); });
    reg("featurize_ts/grads_parallel", [](benchmark::State& s) {
      RunTsGradients(s, GradientMethod::kParallel);
    });
    reg("featurize_ts/query_loop",
        [](benchmark::State& s) { RunTsQuerySide(s, GradientMethod::kLoop); });
    reg("featurize_ts/query_parallel", [](benchmark::State& s) {
      RunTsQuerySide(s, GradientMethod::kParallel);
    });
  } else {
    std::printf("# TorchScript benchmarks skipped: %s\n",
                SharedTs().error.c_str());
  }
  retrace::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintRatio("featurize_vs_loop", "featurize/loop",
                      "featurize/layerwise");
  reporter.PrintRatio("featurize_vs_training", "train/step",
                      "featurize/training_side");
  reporter.PrintRatio("featurize_grads_vs_training", "train/step",
                      "featurize/layerwise");
  reporter.PrintRatio("featurize_vs_fwd_bwd", "train/fwd_bwd",
                      "featurize/training_side");
  if (SharedTs().error.empty()) {
    reporter.PrintRatio("torchscript_featurize_vs_loop", "featurize_ts/loop",
                        "featurize_ts/parallel");
    reporter.PrintRatio("torchscript_featurize_vs_loop_1thread",
                        "featurize_ts/loop_1thread", "featurize_ts/parallel");
    reporter.PrintRatio("torchscript_grads_vs_loop", "featurize_ts/grads_loop",
                        "featurize_ts/grads_parallel");
    reporter.PrintRatio("torchscript_query_vs_loop", "featurize_ts/query_loop",
                        "featurize_ts/query_parallel");
  }
  benchmark::Shutdown();
  return 0;
}

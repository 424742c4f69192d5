// The store build on a tiny trained UNet: stored norms, self-influence and
// diagnostics against independent recomputations (plain LibTorch gradients
// with (t, ε) regenerated from the documented keys; naive ranks), timesteps
// inside their buckets, determinism, resume, parts, and bad input.
#include "jobs/build_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "jobs/run_dir.h"
#include "kernels/dtype.h"
#include "server/model/counter_rng.h"
#include "server/model/replay.h"
#include "server/model/schedule.h"
#include "server/model/unet.h"
#include "server/store/store_reader.h"
#include "tests/jobs/tiny_run.h"

namespace retrace::jobs {
namespace {

using testing::DirectoryBytes;
using testing::ExpectSameDirectory;
using testing::FreshDir;
using testing::MakeTinyRun;
using testing::TinyRun;

// The build's norms come from the layerwise per-sample engine and a
// fixed-point projection; the reference is one backward pass in float with
// the norm summed in double.
constexpr double kNormRelTol = 1e-4;
// Self-influence is summed in double from the same fp32 values the store
// holds (dtype F32) and rounded to float once.
constexpr double kSelfInfluenceRelTol = 1e-5;

StoreBuildConfig SmallConfig() {
  StoreBuildConfig config;
  config.dim = 128;
  config.sparsity = 2;
  config.projection_seed = 11;
  config.store_seed = 5;
  config.dtype = kernels::DType::kF32;
  config.samples_per_shard = 7;  // 6 shards, the last with 5 samples
  return config;
}

StoreBuildOptions OptionsFor(const TinyRun& run, const std::string& out) {
  StoreBuildOptions options;
  options.model_path = run.run_dir;
  options.out_dir = out;
  options.dataset_name = data::FormatMixtureSpec(run.spec);
  options.dataset_seed = run.spec.seed;
  options.threads = testing::kTinyThreads;
  options.batch_rows = 8;
  return options;
}

absl::StatusOr<StoreBuildResult> Build(const TinyRun& run,
                                       const StoreBuildConfig& config,
                                       const StoreBuildOptions& options) {
  return BuildStore(config, run.mixture.images, run.mixture.sample_ids,
                    options);
}

// t_j of (n, c, b) straight from the key layout of counter_rng.h:
// e_b + floor(w·(e_{b+1} − e_b) / 2^32), w = word 0 of the kBuildTimestep
// stream keyed (store seed; n, c << 16 | b, j).
int64_t ReferenceTimestep(uint64_t seed, int64_t n, int64_t c, int64_t b,
                          int64_t j, const std::vector<int64_t>& edges) {
  model::RngKey key{
      seed, model::RngStream::kBuildTimestep, static_cast<uint32_t>(n),
      static_cast<uint32_t>((c << 16) | b), static_cast<uint32_t>(j)};
  const uint64_t w = model::RandomWord(key, 0);
  return edges[b] +
         static_cast<int64_t>(
             (w * static_cast<uint64_t>(edges[b + 1] - edges[b])) >> 32);
}

std::vector<float> ReferenceNoise(uint64_t seed, int64_t n, int64_t c,
                                  int64_t b, int64_t j) {
  std::vector<float> eps(28 * 28);
  model::GaussianFill(
      {seed, model::RngStream::kBuildNoise, static_cast<uint32_t>(n),
       static_cast<uint32_t>((c << 16) | b), static_cast<uint32_t>(j)},
      eps.data(), static_cast<int64_t>(eps.size()));
  return eps;
}

// ‖∇_θ ℓ(θ; x, t, ε)‖ over all parameters: one forward and backward pass.
double ReferenceNorm(model::UNetModel& net,
                     const model::NoiseSchedule& schedule,
                     absl::Span<const float> image, int64_t t,
                     const std::vector<float>& eps) {
  std::vector<float> x_t(image.size());
  const double a = std::sqrt(schedule.AlphaBar(static_cast<int>(t)));
  const double s = std::sqrt(1.0 - schedule.AlphaBar(static_cast<int>(t)));
  for (size_t i = 0; i < x_t.size(); ++i) {
    x_t[i] = static_cast<float>(a * image[i] + s * eps[i]);
  }
  const at::Tensor xt =
      at::from_blob(x_t.data(), {1, 1, 28, 28}, at::kFloat).clone();
  const at::Tensor noise =
      at::from_blob(const_cast<float*>(eps.data()), {1, 1, 28, 28}, at::kFloat)
          .clone();
  at::AutoGradMode grad_mode(true);
  auto pred = net.Forward(xt, at::full({1}, t, at::kLong));
  EXPECT_TRUE(pred.ok()) << pred.status();
  const at::Tensor loss = (*pred - noise).pow(2).mean();
  std::vector<at::Tensor> params;
  for (const auto& p : net.NamedParameters()) params.push_back(p.tensor);
  const auto grads = torch::autograd::grad({loss}, params);
  double sum = 0;
  for (const at::Tensor& g : grads) {
    sum += g.to(at::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(sum);
}

// Spearman with ranks counted pair by pair (ties: average rank).
double NaiveSpearman(const std::vector<double>& x,
                     const std::vector<double>& y) {
  auto ranks = [](const std::vector<double>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      double less = 0, equal = 0;
      for (size_t j = 0; j < v.size(); ++j) {
        less += v[j] < v[i];
        equal += v[j] == v[i];
      }
      r[i] = less + (equal + 1) / 2;
    }
    return r;
  };
  const auto rx = ranks(x), ry = ranks(y);
  double mx = 0, my = 0;
  for (size_t i = 0; i < rx.size(); ++i) mx += rx[i], my += ry[i];
  mx /= rx.size();
  my /= ry.size();
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    sxy += (rx[i] - mx) * (ry[i] - my);
    sxx += (rx[i] - mx) * (rx[i] - mx);
    syy += (ry[i] - my) * (ry[i] - my);
  }
  return sxy / std::sqrt(sxx * syy);
}

TEST(BuildStoreTest, NormsSelfInfluenceAndDiagnosticsMatchIndependentValues) {
  const TinyRun run = MakeTinyRun("values");
  const std::string out = FreshDir("values-store");
  StoreBuildConfig config = SmallConfig();
  config.bucket_edges = {0, 100, 250, 600, 1000};
  auto result = Build(run, config, OptionsFor(run, out));
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->complete);
  ASSERT_TRUE(result->manifest.has_value());
  std::printf("tiny UNet (p = %lld): %.1f samples/s (C = 3, S = 5, D = 128)\n",
              static_cast<long long>(result->input_dim),
              result->samples_per_second);

  auto reader = store::StoreReader::Open(out);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const store::StoreReader& r = **reader;
  ASSERT_EQ(r.num_samples(), testing::kTinyImages);
  ASSERT_EQ(r.num_checkpoints(), 3);
  ASSERT_EQ(r.num_buckets(), 4);
  ASSERT_TRUE(r.has_replay());
  const int64_t S = r.num_slots(), D = r.dim(), B = r.num_buckets();
  auto log = model::ReplayLog::Load(run.run_dir);
  ASSERT_TRUE(log.ok());
  auto run_manifest = LoadRun(run.run_dir);
  ASSERT_TRUE(run_manifest.ok());
  auto schedule = model::NoiseSchedule::Create();
  ASSERT_TRUE(schedule.ok());
  at::set_num_threads(testing::kTinyThreads);

  std::vector<std::unique_ptr<model::UNetModel>> nets;
  for (const CheckpointInfo& c : run_manifest->checkpoints) {
    model::UNetConfig unet;
    unet.base_channels = 4;
    unet.channel_mults = {1, 2};
    unet.attention = false;
    unet.norm_groups = 2;
    auto net = model::UNetModel::Create(unet, 0);
    ASSERT_TRUE(net.ok());
    ASSERT_TRUE((*net)->Load(run.run_dir + "/" + c.file).ok());
    nets.push_back(*std::move(net));
  }

  int64_t unseen = 0;
  for (int64_t n = 0; n < r.num_samples(); ++n) {
    auto block = r.Sample(n);
    ASSERT_TRUE(block.ok());
    const float* vectors = static_cast<const float*>(block->vectors);
    EXPECT_EQ(block->sample_ids[0], run.mixture.sample_ids[n]);
    EXPECT_EQ(block->labels[0], run.mixture.images.labels[n]);
    double si_tracin = 0, si_retrac = 0;
    for (int64_t c = 0; c < 3; ++c) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " c=" << c);
      const model::ReplayRecord& record = log->At(c, n);
      const float* norms = block->norms + c * S;
      const float* u = vectors + c * S * D;
      if (record.seen()) {
        EXPECT_EQ(block->train_timesteps[c], record.timestep);
      } else {
        ++unseen;
        EXPECT_EQ(norms[B], 0.0f);
        for (int64_t d = 0; d < D; ++d) ASSERT_EQ(u[B * D + d], 0.0f);
      }
      // Norms recomputed for a few samples, every slot.
      if (n == 0 || n == 17 || n == 39) {
        for (int64_t b = 0; b <= B; ++b) {
          SCOPED_TRACE(::testing::Message() << "slot " << b);
          int64_t t;
          std::vector<float> eps;
          if (b < B) {
            t = ReferenceTimestep(config.store_seed, n, c, b, 0,
                                  config.bucket_edges);
            eps = ReferenceNoise(config.store_seed, n, c, b, 0);
          } else if (record.seen()) {
            model::TrainDraw draw =
                model::ReplayDraw(testing::kTinyRunSeed, record.step,
                                  record.batch_position, 1000, {1, 28, 28});
            t = draw.timestep;
            eps = draw.noise;
          } else {
            continue;
          }
          const double expected = ReferenceNorm(
              *nets[c], *schedule, run.mixture.images.Image(n), t, eps);
          EXPECT_NEAR(norms[b], expected, kNormRelTol * expected);
        }
      }
      // Self-influence from the stored fp32 values (docs/store-build.md,
      // replay form).
      std::vector<double> mean_t(D, 0.0), mean_r(D, 0.0);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t d = 0; d < D; ++d) {
          mean_t[d] += double(norms[b]) * u[b * D + d] / B;
          mean_r[d] += double(u[b * D + d]) / B;
        }
      }
      const double w = run_manifest->checkpoints[c].weight;
      for (int64_t d = 0; d < D; ++d) {
        si_tracin += w * norms[B] * u[B * D + d] * mean_t[d];
        si_retrac += w * u[B * D + d] * mean_r[d];
      }
    }
    EXPECT_NEAR(block->self_influence[0], si_tracin,
                kSelfInfluenceRelTol * std::abs(si_tracin) + 1e-12)
        << "n=" << n;
    EXPECT_NEAR(block->self_influence[1], si_retrac,
                kSelfInfluenceRelTol * std::abs(si_retrac) + 1e-12)
        << "n=" << n;
  }
  EXPECT_EQ(unseen, 8);  // checkpoint 0 (step 4) has seen 32 of 40 samples

  // Diagnostics: Spearman per checkpoint over (sample, bucket) pairs, and the
  // sampled timesteps' range per bucket.
  const auto& diagnostics = r.manifest().diagnostics;
  ASSERT_TRUE(diagnostics.contains("norm_stats"));
  ASSERT_EQ(diagnostics["spearman"].size(), 3u);
  EXPECT_EQ(diagnostics["spearman_pairs"], testing::kTinyImages * B);
  for (int64_t c = 0; c < 3; ++c) {
    std::vector<double> t, g;
    std::vector<double> lo(B, 1e9), hi(B, -1e9);
    for (int64_t n = 0; n < r.num_samples(); ++n) {
      auto block = r.Sample(n);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t ts = ReferenceTimestep(config.store_seed, n, c, b, 0,
                                             config.bucket_edges);
        ASSERT_GE(ts, config.bucket_edges[b]);
        ASSERT_LT(ts, config.bucket_edges[b + 1]);
        t.push_back(ts);
        g.push_back(block->norms[c * S + b]);
        lo[b] = std::min<double>(lo[b], ts);
        hi[b] = std::max<double>(hi[b], ts);
      }
    }
    EXPECT_NEAR(diagnostics["spearman"][c].get<double>(), NaiveSpearman(t, g),
                1e-12);
    for (int64_t b = 0; b < B; ++b) {
      EXPECT_EQ(diagnostics["sampled_timestep_range"][c][b][0].get<double>(),
                lo[b]);
      EXPECT_EQ(diagnostics["sampled_timestep_range"][c][b][1].get<double>(),
                hi[b]);
    }
  }
}

TEST(BuildStoreTest, SeveralTimestepsPerBucketStayInsideTheirBuckets) {
  const TinyRun run = MakeTinyRun("draws");
  const std::string out = FreshDir("draws-store");
  StoreBuildConfig config = SmallConfig();
  config.num_buckets = 10;
  config.grad_timesteps = 3;
  config.replay = ReplayMode::kOff;
  auto result = Build(run, config, OptionsFor(run, out));
  ASSERT_TRUE(result.ok()) << result.status();
  const auto& manifest = *result->manifest;
  EXPECT_FALSE(manifest.spec.buckets.replay);
  const std::vector<int64_t>& edges = manifest.spec.buckets.edges;
  ASSERT_EQ(edges.size(), 11u);
  auto reader = store::StoreReader::Open(out);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->shards()[0].train_timesteps, nullptr);
  for (int64_t c = 0; c < 3; ++c) {
    std::vector<double> t, g;
    for (int64_t n = 0; n < testing::kTinyImages; ++n) {
      auto block = (*reader)->Sample(n);
      for (int64_t b = 0; b < 10; ++b) {
        double sum = 0;
        for (int64_t j = 0; j < 3; ++j) {
          const int64_t ts = ReferenceTimestep(5, n, c, b, j, edges);
          EXPECT_GE(ts, edges[b]);
          EXPECT_LT(ts, edges[b + 1]);
          sum += ts;
        }
        t.push_back(sum / 3);
        g.push_back(block->norms[c * 10 + b]);
      }
    }
    EXPECT_NEAR(manifest.diagnostics["spearman"][c].get<double>(),
                NaiveSpearman(t, g), 1e-12);
    for (int64_t b = 0; b < 10; ++b) {
      const auto& range = manifest.diagnostics["sampled_timestep_range"][c][b];
      EXPECT_GE(range[0].get<double>(), edges[b]);
      EXPECT_LT(range[1].get<double>(), edges[b + 1]);
    }
  }
}

TEST(BuildStoreTest, SameSeedsGiveIdenticalBytesAndAResumeChangesNothing) {
  const TinyRun run = MakeTinyRun("bytes");
  const StoreBuildConfig config = SmallConfig();
  const std::string first = FreshDir("bytes-a");
  ASSERT_TRUE(Build(run, config, OptionsFor(run, first)).ok());
  const std::string second = FreshDir("bytes-b");
  ASSERT_TRUE(Build(run, config, OptionsFor(run, second)).ok());
  ExpectSameDirectory(first, second);

  // Stopped after a few chunks (mid-shard), then resumed.
  const std::string resumed = FreshDir("bytes-resumed");
  StoreBuildOptions options = OptionsFor(run, resumed);
  options.should_stop = [](int64_t done) { return done >= 22; };
  auto stopped = Build(run, config, options);
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_FALSE(stopped->complete);
  EXPECT_FALSE(std::filesystem::exists(resumed + "/manifest.json"));
  options.should_stop = nullptr;
  auto finished = Build(run, config, options);
  ASSERT_TRUE(finished.ok()) << finished.status();
  EXPECT_TRUE(finished->complete);
  EXPECT_EQ(finished->resumed_samples, 21);  // three full shards of 7
  ExpectSameDirectory(first, resumed);

  // Another store seed draws other timesteps: other shards.
  StoreBuildConfig other = config;
  other.store_seed = 6;
  const std::string third = FreshDir("bytes-c");
  ASSERT_TRUE(Build(run, other, OptionsFor(run, third)).ok());
  EXPECT_NE(DirectoryBytes(first).at("shard-00000.safetensors"),
            DirectoryBytes(third).at("shard-00000.safetensors"));
}

TEST(BuildStoreTest, PartsJoinedEqualTheWholeBuild) {
  const TinyRun run = MakeTinyRun("parts");
  const StoreBuildConfig config = SmallConfig();
  const std::string whole = FreshDir("parts-whole");
  ASSERT_TRUE(Build(run, config, OptionsFor(run, whole)).ok());
  const std::string joined = FreshDir("parts-joined");
  // Parts in an order other than 0, 1, 2; each could run on its own machine.
  for (int64_t i : {2, 0, 1}) {
    StoreBuildOptions options = OptionsFor(run, joined);
    options.num_parts = 3;
    options.part_index = i;
    auto part = Build(run, config, options);
    ASSERT_TRUE(part.ok()) << part.status();
    ASSERT_TRUE(part->part.has_value());
    EXPECT_FALSE(part->manifest.has_value());
    EXPECT_FALSE(std::filesystem::exists(joined + "/manifest.json"));
  }
  auto manifest = JoinStore(joined);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  ExpectSameDirectory(whole, joined);
}

TEST(BuildStoreTest, JoinRefusesMissingParts) {
  const TinyRun run = MakeTinyRun("missing-part");
  const std::string dir = FreshDir("missing-part-store");
  StoreBuildOptions options = OptionsFor(run, dir);
  options.num_parts = 2;
  options.part_index = 1;
  ASSERT_TRUE(Build(run, SmallConfig(), options).ok());
  auto joined = JoinStore(dir);
  EXPECT_FALSE(joined.ok());
  EXPECT_FALSE(std::filesystem::exists(dir + "/manifest.json"));
}

TEST(BuildStoreTest, RefusesACheckpointWhoseHashDiffers) {
  const TinyRun run = MakeTinyRun("tampered");
  const std::string ckpt = run.run_dir + "/" + CheckpointFileName(8);
  {
    std::fstream f(ckpt, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x5a');
  }
  const std::string out = FreshDir("tampered-store");
  auto result = Build(run, SmallConfig(), OptionsFor(run, out));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(result.status().message().find(ckpt), std::string::npos)
      << result.status();
  auto recorded = LoadRun(run.run_dir, /*verify_checksums=*/false);
  ASSERT_TRUE(recorded.ok());
  EXPECT_NE(result.status().message().find(recorded->checkpoints[1].sha256),
            std::string::npos)
      << result.status();
  EXPECT_FALSE(std::filesystem::exists(out + "/manifest.json"));
}

TEST(BuildStoreTest, RefusesDataOtherThanTheRuns) {
  const TinyRun run = MakeTinyRun("otherdata");
  data::ImageSet images = run.mixture.images;
  images.pixels[100] = -images.pixels[100] + 0.5f;
  const std::string out = FreshDir("otherdata-store");
  auto result = BuildStore(SmallConfig(), images, run.mixture.sample_ids,
                           OptionsFor(run, out));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(result.status().message().find("does not match"), std::string::npos)
      << result.status();
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(BuildStoreTest, RefusesAnUnwritableOutput) {
  const TinyRun run = MakeTinyRun("unwritable");
  // A regular file where a directory is needed (root ignores permissions).
  const std::string blocker = FreshDir("unwritable-file");
  { std::ofstream(blocker) << "x"; }
  const std::string out = blocker + "/store";
  auto result = Build(run, SmallConfig(), OptionsFor(run, out));
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.status().message().find(blocker), std::string::npos)
      << result.status();
}

TEST(BuildStoreTest, RefusesBadConfig) {
  const TinyRun run = MakeTinyRun("badconfig");
  StoreBuildConfig config = SmallConfig();
  config.bucket_edges = {0, 500, 400, 1000};
  EXPECT_EQ(
      Build(run, config, OptionsFor(run, FreshDir("bad1"))).status().code(),
      absl::StatusCode::kInvalidArgument);
  config = SmallConfig();
  config.param_regex = "no\\.such\\.parameter";
  EXPECT_EQ(
      Build(run, config, OptionsFor(run, FreshDir("bad2"))).status().code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::jobs

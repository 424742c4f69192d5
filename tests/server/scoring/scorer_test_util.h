// A small random store written with StoreWriter, for Scorer tests.
#ifndef RETRACE_TESTS_SERVER_SCORING_SCORER_TEST_UTIL_H_
#define RETRACE_TESTS_SERVER_SCORING_SCORER_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "server/scoring/scorer.h"
#include "server/store/store_reader.h"
#include "server/store/store_writer.h"

namespace retrace::scoring::testing {

struct TestStoreParams {
  int64_t n = 300;
  int32_t checkpoints = 2;
  int32_t buckets = 3;
  bool replay = true;
  int64_t dim = 40;
  kernels::DType dtype = kernels::DType::kF16;
  int64_t samples_per_shard = 128;
  uint32_t seed = 7;
};

// Writes a store under a fresh temporary directory and returns its path.
inline std::string WriteTestStore(const TestStoreParams& p,
                                  const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  std::filesystem::remove_all(dir);
  store::StoreSpec spec;
  spec.model.architecture = "test";
  for (int32_t c = 0; c < p.checkpoints; ++c) {
    store::CheckpointInfo ck;
    ck.file = "ckpt-" + std::to_string(c) + ".pt";
    ck.sha256 = std::string(64, 'a' + c);
    ck.weight = 0.5 + c;
    ck.step = 100 * (c + 1);
    spec.model.checkpoints.push_back(ck);
  }
  for (int32_t b = 0; b <= p.buckets; ++b)
    spec.buckets.edges.push_back(b * 1000 / p.buckets);
  spec.buckets.replay = p.replay;
  spec.projection.dim = p.dim;
  spec.projection.sparsity = 2;
  spec.projection.seed = 1;
  spec.projection.input_dim = 1000;
  spec.dtype = p.dtype;
  spec.samples_per_shard = p.samples_per_shard;
  spec.dataset = {{"name", "synthetic"}};
  auto writer = store::StoreWriter::Create(dir, spec);
  EXPECT_TRUE(writer.ok()) << writer.status();
  std::mt19937 rng(p.seed);
  std::normal_distribution<float> normal(0, 1);
  std::uniform_real_distribution<float> pos(0.1f, 4.0f);
  const int32_t slots = p.buckets + (p.replay ? 1 : 0);
  const int64_t pairs = int64_t{p.checkpoints} * slots;
  std::vector<float> v(pairs * p.dim), norms(pairs);
  std::vector<int32_t> ts(p.replay ? p.checkpoints : 0);
  for (int64_t n = 0; n < p.n; ++n) {
    for (float& x : v) x = normal(rng) / std::sqrt(float(p.dim));
    for (float& x : norms) x = pos(rng);
    for (int32_t& t : ts) t = int32_t(rng() % 1000);
    store::SampleRecord r;
    r.sample_id = 1000 + 7 * n;
    r.label = int32_t(n % 10);
    r.vectors = v;
    r.norms = norms;
    r.train_timesteps = ts;
    EXPECT_TRUE((*writer)->Append(r).ok());
  }
  auto manifest = (*writer)->Finish();
  EXPECT_TRUE(manifest.ok()) << manifest.status();
  return dir;
}

inline BucketQuery RandomQuery(const StoreShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0, 1);
  BucketQuery q;
  const size_t size =
      size_t(shape.num_checkpoints) * shape.num_buckets * shape.dim;
  q.raw.resize(size);
  q.unit.resize(size);
  for (float& x : q.raw) x = 3.0f * normal(rng);
  for (float& x : q.unit) x = normal(rng);
  return q;
}

}  // namespace retrace::scoring::testing

#endif  // RETRACE_TESTS_SERVER_SCORING_SCORER_TEST_UTIL_H_

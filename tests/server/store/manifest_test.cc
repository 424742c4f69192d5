#include "server/store/manifest.h"

#include <cmath>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/store/norm_stats.h"
#include "tests/server/store/store_test_data.h"

namespace retrace::store {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

Manifest MakeManifest() {
  Manifest m;
  m.spec = testing::MakeSpec(kernels::DType::kBF16, /*replay=*/true, 10);
  m.spec.noise_schedule.type = "linear";
  m.spec.noise_schedule.beta_start = 1e-4;
  m.spec.noise_schedule.beta_end = 0.02;
  m.num_samples = 25;
  for (int64_t i = 0; i < 3; ++i) {
    m.shards.push_back({"shard-0000" + std::to_string(i) + ".safetensors",
                        10 * i, i < 2 ? 10 : 5,
                        std::string(64, char('0' + i))});
  }
  m.store_id = *ComputeStoreId(m.spec, m.num_samples, m.shards);
  m.diagnostics = {{"spearman", {0.5, -0.25}}};
  return m;
}

TEST(ManifestTest, RoundTripsThroughJson) {
  Manifest m = MakeManifest();
  absl::StatusOr<std::string> text = m.Serialize();
  ASSERT_TRUE(text.ok()) << text.status();
  absl::StatusOr<Manifest> back = Manifest::Parse(*text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->spec == m.spec);
  EXPECT_EQ(back->store_id, m.store_id);
  EXPECT_EQ(back->num_samples, 25);
  EXPECT_EQ(back->shards, m.shards);
  EXPECT_EQ(back->diagnostics, m.diagnostics);
  EXPECT_EQ(back->spec.projection.seed, 0x9e3779b97f4a7c15ull);
  // Serializing the parsed manifest gives the same bytes.
  EXPECT_EQ(*back->Serialize(), *text);
}

TEST(ManifestTest, SerializationIsSortedAndStable) {
  const std::string text = *MakeManifest().Serialize();
  EXPECT_EQ(text.back(), '\n');
  // Top-level keys appear in sorted order.
  std::vector<std::string> keys = {"buckets",
                                   "dataset",
                                   "diagnostics",
                                   "dtype",
                                   "format",
                                   "format_version",
                                   "grad_timesteps",
                                   "loss",
                                   "model",
                                   "noise_schedule",
                                   "num_samples",
                                   "projection",
                                   "samples_per_shard",
                                   "shards",
                                   "store_id"};
  size_t last = 0;
  for (const std::string& k : keys) {
    size_t at = text.find("\n  \"" + k + "\":");
    ASSERT_NE(at, std::string::npos) << k;
    EXPECT_GT(at, last) << k;
    last = at;
  }
  EXPECT_THAT(text, HasSubstr("\"format\": \"retrace-store\""));
  EXPECT_THAT(text, HasSubstr("\"format_version\": 1"));
  EXPECT_THAT(text, HasSubstr("\"dtype\": \"BF16\""));
  EXPECT_THAT(text, HasSubstr("\"beta_end\": 0.02"));
}

TEST(ManifestTest, StoreIdDependsOnContentAndSpec) {
  Manifest m = MakeManifest();
  const std::string id = *ComputeStoreId(m.spec, m.num_samples, m.shards);
  EXPECT_EQ(id.size(), 64u);
  EXPECT_EQ(id, *ComputeStoreId(m.spec, m.num_samples, m.shards));
  std::vector<ShardInfo> other = m.shards;
  other[1].sha256 = std::string(64, 'f');
  EXPECT_NE(id, *ComputeStoreId(m.spec, m.num_samples, other));
  StoreSpec spec = m.spec;
  spec.projection.seed += 1;
  EXPECT_NE(id, *ComputeStoreId(spec, m.num_samples, m.shards));
}

// Removes the field at a dotted path ("projection.dim") from the manifest JSON.
json Without(json j, const std::string& path) {
  json* node = &j;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string key = path.substr(start, dot - start);
    if (dot == std::string::npos) {
      node->erase(key);
      return j;
    }
    node = &(*node)[key];
    start = dot + 1;
  }
}

TEST(ManifestTest, MissingFieldsAreNamed) {
  const json good = MakeManifest().ToJson();
  for (const std::string field :
       {"projection.dim", "projection.seed", "projection.type",
        "model.architecture", "model.checkpoints", "noise_schedule.type",
        "noise_schedule.beta_start", "loss", "buckets.edges", "buckets.replay",
        "grad_timesteps", "dtype", "samples_per_shard", "num_samples", "shards",
        "store_id", "dataset", "format_version"}) {
    SCOPED_TRACE(field);
    absl::StatusOr<Manifest> m = Manifest::FromJson(Without(good, field));
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(m.status().message(),
              "manifest.json: field '" + field + "' missing");
  }
}

struct FieldCase {
  std::string path;  // JSON pointer
  json value;
  std::string message;
};

TEST(ManifestTest, InvalidFieldsAreNamed) {
  const json good = MakeManifest().ToJson();
  std::vector<FieldCase> cases = {
      {"/projection/dim", 0, "field 'projection.dim' must be >= 1, got 0"},
      {"/projection/dim", "16", "field 'projection.dim' must be an integer"},
      {"/projection/dim", 16.5, "field 'projection.dim' must be an integer"},
      {"/projection/type", "gaussian",
       "field 'projection.type' is \"gaussian\""},
      {"/projection/sparsity", 9,
       "field 'projection.sparsity' must be in 1..8"},
      {"/loss", "huber", "field 'loss' is \"huber\""},
      {"/dtype", "F64", "field 'dtype' is \"F64\""},
      {"/buckets/edges",
       {0, 500, 400, 1000},
       "'buckets.edges' must be strictly increasing"},
      {"/buckets/edges", {0, 500, 999}, "'buckets.edges' must run from 0 to"},
      {"/buckets/edges/1", "x", "field 'buckets.edges[1]' must be an integer"},
      {"/model/checkpoints/1/sha256", "abc",
       "'model.checkpoints[1].sha256' must be 64"},
      {"/model/checkpoints", json::array(),
       "'model.checkpoints' must list at least one"},
      {"/shards/1/first", 11, "field 'shards[1].first' is 11, expected 10"},
      {"/shards/2/count", 0, "field 'shards[2].count' must be >= 1"},
      {"/shards/0/file", "../etc/passwd", "field 'shards[0].file'"},
      {"/shards/1/file", "shard-00000.safetensors", "is listed twice"},
      {"/num_samples", 26, "field 'num_samples' is 26 but the shards hold 25"},
      {"/dataset", json::object(), "field 'dataset.name' missing"},
      {"/grad_timesteps", 0, "field 'grad_timesteps' must be >= 1"},
      {"/samples_per_shard", int64_t(1) << 59,
       "field 'samples_per_shard' is too large for rows of 144 bytes"},
      {"/noise_schedule/beta_end", 2.0, "noise_schedule.beta_start"},
      {"/noise_schedule/type", "betas", "field 'noise_schedule.values'"},
      {"/noise_schedule/type", "quadratic",
       "field 'noise_schedule.type' is \"quadratic\"; expected one of"},
      {"/loss", "huber", "field 'loss' is \"huber\"; expected one of"},
      {"/model/image",
       {{"channels", 3}, {"height", 32}, {"width", 32},
        {"pixel_range", {1.0, -1.0}}},
       "field 'model.image.pixel_range'"},
  };
  for (const FieldCase& c : cases) {
    SCOPED_TRACE(c.path + " = " + c.value.dump());
    json j = good;
    j[json::json_pointer(c.path)] = c.value;
    absl::StatusOr<Manifest> m = Manifest::FromJson(j);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(m.status().message(), HasSubstr("manifest.json: "));
    EXPECT_THAT(m.status().message(), HasSubstr(c.message));
  }
}

TEST(ManifestTest, UnknownFormatVersionIsFailedPrecondition) {
  json j = MakeManifest().ToJson();
  j["format_version"] = 2;
  absl::StatusOr<Manifest> m = Manifest::FromJson(j, "/s/manifest.json");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(m.status().message(),
              HasSubstr("/s/manifest.json: field 'format_version' is 2; this "
                        "build reads version 1"));
  j["format_version"] = 1;
  j["format"] = "other";
  EXPECT_EQ(Manifest::FromJson(j).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ManifestTest, MalformedJson) {
  absl::StatusOr<Manifest> m =
      Manifest::Parse("{\"format\": ", "x/manifest.json");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(),
              HasSubstr("x/manifest.json: malformed JSON"));
}

TEST(ManifestTest, ExplicitScheduleAndImageRoundTrip) {
  Manifest m = MakeManifest();
  m.spec.noise_schedule.type = "alpha_bars";
  m.spec.noise_schedule.timesteps = 4;
  m.spec.noise_schedule.values = {0.9, 0.5, 0.25, 0.125};
  m.spec.buckets.edges = {0, 2, 4};
  m.spec.model.image = {3, 32, 16, 0.0, 1.0};
  m.spec.model.prediction = "epsilon";
  m.store_id = *ComputeStoreId(m.spec, m.num_samples, m.shards);
  ASSERT_TRUE(m.Validate().ok()) << m.Validate();
  const std::string text = *m.Serialize();
  absl::StatusOr<Manifest> back = Manifest::Parse(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->spec.noise_schedule.values, m.spec.noise_schedule.values);
  EXPECT_EQ(back->spec.model.image.channels, 3);
  EXPECT_EQ(back->spec.model.image.width, 16);
  EXPECT_EQ(back->spec.model.image.pixel_min, 0.0);
  EXPECT_TRUE(back->spec == m.spec);
  // A list whose length is not T is refused, naming the field.
  m.spec.noise_schedule.values.pop_back();
  EXPECT_THAT(m.spec.Validate().message(), HasSubstr("noise_schedule.values"));
}

TEST(ManifestTest, CosineScheduleOmitsBetas) {
  StoreSpec spec = testing::MakeSpec(kernels::DType::kF16, false, 4);
  json j = json::object();
  spec.ToJson(&j);
  EXPECT_FALSE(j["noise_schedule"].contains("beta_start"));
  EXPECT_EQ(j["noise_schedule"]["type"], "cosine");
  EXPECT_EQ(j["noise_schedule"]["timesteps"], 1000);
}

TEST(ManifestTest, SpecHashIgnoresNothingThatMatters) {
  StoreSpec a = testing::MakeSpec(kernels::DType::kF16, false, 4);
  StoreSpec b = a;
  EXPECT_EQ(*a.Sha256(), *b.Sha256());
  b.samples_per_shard = 5;
  EXPECT_NE(*a.Sha256(), *b.Sha256());
  b = a;
  b.dataset["provenance"]["seed"] = 8;
  EXPECT_NE(*a.Sha256(), *b.Sha256());
}

TEST(ManifestTest, SpecRejectsInvalidUtf8) {
  StoreSpec spec = testing::MakeSpec(kernels::DType::kF16, false, 4);
  spec.model.architecture = "bad\xff";
  EXPECT_EQ(spec.Sha256().status().code(), absl::StatusCode::kInvalidArgument);
}

// --- norm statistics ---

TEST(NormStatsTest, QuantilesMatchHandComputedValues) {
  // Sorted: 1 2 3 4 10. Median 3; p95 at position 3.8: 4 + 0.8 * 6 = 8.8.
  EXPECT_DOUBLE_EQ(Quantile({10, 2, 4, 1, 3}, 0.5), 3.0);
  EXPECT_DOUBLE_EQ(Quantile({10, 2, 4, 1, 3}, 0.95), 8.8);
  EXPECT_DOUBLE_EQ(Quantile({4, 1, 3, 2}, 0.5),
                   2.5);  // even count: mean of middle two
  EXPECT_DOUBLE_EQ(Quantile({7}, 0.95), 7.0);
  EXPECT_TRUE(std::isnan(Quantile({}, 0.5)));
}

TEST(NormStatsTest, PerCheckpointAndSlot) {
  // 3 samples, C = 1, S = 2: slot 0 gets 1, 2, 6; slot 1 gets 10, 20, 30.
  std::vector<float> norms = {1, 10, 2, 20, 6, 30};
  json stats = ComputeNormStats(norms, 3, 1, 2);
  EXPECT_EQ(stats["num_samples"], 3);
  EXPECT_DOUBLE_EQ(stats["mean"][0][0].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(stats["mean"][0][1].get<double>(), 20.0);
  EXPECT_DOUBLE_EQ(stats["median"][0][0].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(stats["p95"][0][1].get<double>(), 29.0);  // 20 + 0.9 * 10
  json empty = ComputeNormStats({}, 0, 2, 1);
  EXPECT_TRUE(empty["median"][1][0].is_null());
}

}  // namespace
}  // namespace retrace::store

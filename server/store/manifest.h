// The manifest of a retrace store (manifest.json) and the build spec it embeds.
//
// StoreSpec is everything a build is configured with; Manifest adds what the
// build produced (shards, sample count, store id, diagnostics). Both convert to
// and from JSON. Serialization is deterministic: keys sorted, no timestamps,
// doubles printed in the shortest form that reads back exactly, so two builds
// of the same data give identical bytes. The schema is documented field by
// field in docs/store-format.md.
//
// Plain value types; thread-compatible.
#ifndef RETRACE_SERVER_STORE_MANIFEST_H_
#define RETRACE_SERVER_STORE_MANIFEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/dtype.h"
#include "kernels/projection.h"
#include "nlohmann/json.hpp"

namespace retrace::store {

inline constexpr char kFormatName[] = "retrace-store";
inline constexpr int64_t kFormatVersion = 1;
inline constexpr char kManifestFileName[] = "manifest.json";

// The store format knows no model: it records the noise schedule and the
// loss by name ("cosine", "linear", "betas", "alpha_bars"; "mse", "l1") and
// leaves their meaning to the model library, which maps the
// names to its types. The projection type is the kernels' own
// ("sjlt"/"rademacher", kernels::ProjectionTypeName).
using kernels::ProjectionType;

// The names a manifest may hold in noise_schedule.type and loss.
inline constexpr const char* kScheduleTypeNames[] = {"cosine", "linear",
                                                     "betas", "alpha_bars"};
inline constexpr const char* kLossNames[] = {"mse", "l1"};

struct CheckpointInfo {
  std::string file;     // as the build found it (path or name)
  std::string sha256;   // of the checkpoint file, 64 lowercase hex digits
  double weight = 1.0;  // w_c: learning rate times the steps it stands for
  int64_t step = 0;     // training step of the checkpoint

  bool operator==(const CheckpointInfo&) const;
};

// The shape of the model's input images and the range that 8-bit pixels
// 0..255 map to linearly. channels == 0: not recorded (stores written before
// model descriptions existed); readers then assume 1×28×28 in [−1, 1].
struct ImageInfo {
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  double pixel_min = -1.0;
  double pixel_max = 1.0;

  bool operator==(const ImageInfo&) const;
};

struct ModelInfo {
  std::string architecture;
  std::vector<CheckpointInfo> checkpoints;  // C >= 1, in checkpoint order c
  ImageInfo image;
  // What the network predicts; only "epsilon" exists today. Empty: not
  // recorded (read as "epsilon").
  std::string prediction;

  bool operator==(const ModelInfo&) const;
};

struct NoiseScheduleInfo {
  std::string type = "cosine";  // one of kScheduleTypeNames
  int64_t timesteps = 1000;     // T
  // Only meaningful (and only serialized) for "linear".
  double beta_start = 1e-4;
  double beta_end = 0.02;
  // The T values of "betas" or "alpha_bars"; empty for the others.
  std::vector<double> values;

  bool operator==(const NoiseScheduleInfo&) const;
};

struct BucketInfo {
  // B + 1 strictly increasing edges from 0 to T: bucket b is [edges[b],
  // edges[b+1]).
  std::vector<int64_t> edges;
  bool replay = false;  // whether slot B (the last slot) is the replay slot

  int64_t num_buckets() const {
    return edges.empty() ? 0 : int64_t(edges.size()) - 1;
  }
  int64_t num_slots() const { return num_buckets() + (replay ? 1 : 0); }
  bool operator==(const BucketInfo&) const;
};

struct ProjectionInfo {
  ProjectionType type = ProjectionType::kSjlt;
  int64_t dim = 0;       // D
  int64_t sparsity = 1;  // s, 1..8 for sjlt; recorded as given for rademacher
  uint64_t seed = 0;
  std::string param_regex;  // parameters projected; empty means all trainable
  int64_t input_dim = 0;    // p

  bool operator==(const ProjectionInfo&) const;
};

// What a store build is configured with. A rerun of a build with an equal spec
// resumes the earlier one (see StoreWriter).
struct StoreSpec {
  ModelInfo model;
  NoiseScheduleInfo noise_schedule;
  std::string loss = "mse";  // one of kLossNames
  BucketInfo buckets;
  ProjectionInfo projection;
  int64_t grad_timesteps = 1;  // m
  kernels::DType dtype = kernels::DType::kF16;
  int64_t samples_per_shard = 4096;
  // Free-form object; must hold a string "name". Conventionally also "root"
  // (where images can be read for thumbnails) and provenance fields.
  nlohmann::json dataset = nlohmann::json::object();

  int64_t num_checkpoints() const { return int64_t(model.checkpoints.size()); }
  int64_t num_buckets() const { return buckets.num_buckets(); }
  int64_t num_slots() const { return buckets.num_slots(); }

  // InvalidArgument naming the first offending field ("projection.dim must be
  // > 0, got 0").
  absl::Status Validate() const;

  // Writes the spec's fields into `out` (an object). Deterministic.
  void ToJson(nlohmann::json* out) const;
  // Reads the spec's fields from a manifest object; `source` prefixes errors.
  static absl::StatusOr<StoreSpec> FromJson(const nlohmann::json& j,
                                            absl::string_view source);

  // Canonical compact JSON of the spec and its sha256: equal specs, equal hash.
  absl::StatusOr<std::string> CanonicalJson() const;
  absl::StatusOr<std::string> Sha256() const;

  bool operator==(const StoreSpec&) const;
  bool operator!=(const StoreSpec& o) const { return !(*this == o); }
};

struct ShardInfo {
  std::string file;    // name relative to the store directory
  int64_t first = 0;   // global index of the shard's first sample
  int64_t count = 0;   // samples in the shard
  std::string sha256;  // of the whole shard file

  bool operator==(const ShardInfo&) const;
};

struct Manifest {
  StoreSpec spec;
  std::string store_id;  // 64 hex digits, see ComputeStoreId
  int64_t num_samples = 0;
  std::vector<ShardInfo> shards;
  // Object: "norm_stats" (written by StoreWriter) plus caller-supplied keys.
  nlohmann::json diagnostics = nlohmann::json::object();

  nlohmann::json ToJson() const;
  // Pretty-printed JSON with a trailing newline; deterministic.
  absl::StatusOr<std::string> Serialize() const;

  // Parses and validates. Errors name the field:
  //   InvalidArgument "manifest.json: field 'projection.dim' missing"
  //   FailedPrecondition for an unknown format name or version.
  static absl::StatusOr<Manifest> FromJson(
      const nlohmann::json& j, absl::string_view source = kManifestFileName);
  static absl::StatusOr<Manifest> Parse(
      absl::string_view text, absl::string_view source = kManifestFileName);

  // Checks spec validity, that shards are contiguous from 0, each non-empty,
  // with safe file names and 64-hex checksums, and that counts sum to
  // num_samples. InvalidArgument naming the field.
  absl::Status Validate(absl::string_view source = kManifestFileName) const;
};

// store_id = sha256 over "retrace-store/1\n", the spec's canonical JSON, "\n",
// num_samples, "\n" and each shard's sha256 followed by "\n". It identifies
// content and configuration; diagnostics do not enter it.
absl::StatusOr<std::string> ComputeStoreId(
    const StoreSpec& spec, int64_t num_samples,
    const std::vector<ShardInfo>& shards);

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_MANIFEST_H_

#include "server/featurize/timesteps.h"

#include "absl/strings/str_cat.h"

namespace retrace::featurize {

absl::Status ValidateBucketEdges(absl::Span<const int64_t> edges,
                                 int64_t num_timesteps) {
  if (edges.size() < 2 ||
      static_cast<int64_t>(edges.size()) > kMaxBuckets + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("bucket edges: need 2..", kMaxBuckets + 1, " edges, got ",
                     edges.size()));
  }
  if (edges.front() != 0 || edges.back() != num_timesteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bucket edges must start at 0 and end at T = ", num_timesteps, ", got ",
        edges.front(), " .. ", edges.back()));
  }
  for (size_t i = 1; i < edges.size(); ++i) {
    if (edges[i] <= edges[i - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("bucket edges must increase strictly; edge ", i, " (",
                       edges[i], ") <= edge ", i - 1, " (", edges[i - 1], ")"));
    }
  }
  return absl::OkStatus();
}

std::vector<int64_t> EqualBucketEdges(int64_t num_buckets,
                                      int64_t num_timesteps) {
  std::vector<int64_t> edges(num_buckets + 1);
  for (int64_t b = 0; b <= num_buckets; ++b) {
    edges[b] = b * num_timesteps / num_buckets;
  }
  return edges;
}

model::RngKey BuildKey(model::RngStream stream, uint64_t store_seed,
                       int64_t sample, int64_t checkpoint, int64_t bucket,
                       int64_t draw) {
  model::RngKey key;
  key.seed = store_seed;
  key.stream = stream;
  key.id0 = static_cast<uint32_t>(sample);
  key.id1 = static_cast<uint32_t>(checkpoint << 16 | bucket);
  key.id2 = static_cast<uint32_t>(draw);
  return key;
}

model::RngKey QueryNoiseKey(uint64_t request_seed, int64_t checkpoint,
                            int64_t bucket, int64_t s_index, int64_t draw) {
  model::RngKey key;
  key.seed = request_seed;
  key.stream = model::RngStream::kQueryNoise;
  key.id0 = static_cast<uint32_t>(checkpoint);
  key.id1 = static_cast<uint32_t>(bucket << 16 | s_index);
  key.id2 = static_cast<uint32_t>(draw);
  return key;
}

int64_t BuildTimestep(uint64_t store_seed, int64_t sample, int64_t checkpoint,
                      int64_t bucket, int64_t draw, int64_t lo, int64_t hi) {
  return model::UniformInt(
      BuildKey(model::RngStream::kBuildTimestep, store_seed, sample, checkpoint,
               bucket, draw),
      lo, hi);
}

std::vector<int64_t> QueryTimesteps(int64_t lo, int64_t hi, int64_t k) {
  std::vector<int64_t> out(k);
  const int64_t width = hi - lo;
  for (int64_t i = 0; i < k; ++i) out[i] = lo + (2 * i + 1) * width / (2 * k);
  return out;
}

}  // namespace retrace::featurize

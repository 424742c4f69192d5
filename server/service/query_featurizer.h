// The query side of an attribution request, behind an interface so that the
// service can be run (and tested) with any source of query vectors: the
// model-backed featurizer (model_featurizer.h) in retraced, or none at all
// when a server only serves precomputed query vectors (a shard behind a
// router).
#ifndef RETRACE_SERVER_SERVICE_QUERY_FEATURIZER_H_
#define RETRACE_SERVER_SERVICE_QUERY_FEATURIZER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "server/scoring/query_plan.h"

namespace retrace::service {

// One decoded query image: channel-major [channels, height, width] floats in
// [-1, 1].
struct QueryImage {
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  std::vector<float> pixels;
};

// The request's query-side options (AttributeRequest fields of the same
// names, defaults already applied and ranges checked by the engine).
struct QueryFeatureOptions {
  int64_t query_timesteps = 2;
  int64_t noise_draws = 4;
  uint64_t seed = 0;
};

// What Featurize returns: the vectors and, of the time it took, how much went
// to the random projection (reported as the "project" stage).
struct FeaturizedQuery {
  scoring::BucketQuery vectors;
  double project_seconds = 0;
};

class QueryFeaturizer {
 public:
  virtual ~QueryFeaturizer() = default;

  // [channels, height, width] of the images the model takes.
  virtual std::vector<int64_t> image_shape() const = 0;

  // q_raw and q_unit for every checkpoint and bucket, each [C, B, D]
  // row-major, for the store being served. Deterministic for a given image
  // and options. Thread-safe: concurrent calls share a pool of workers.
  //   InvalidArgument: an image of the wrong shape, non-finite gradients.
  //   ResourceExhausted / Internal: model failures.
  virtual absl::StatusOr<FeaturizedQuery> Featurize(
      const QueryImage& image, const QueryFeatureOptions& options) = 0;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_QUERY_FEATURIZER_H_

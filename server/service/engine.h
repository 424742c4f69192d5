// The attribution pipeline without the wire: validates a request, decodes its
// input, featurizes it (or takes its precomputed vectors), queues it for the
// batched scan and assembles the ranked response with per-stage timings.
//
// Stages (as reported in AttributeResponse.timings and the
// retrace_stage_duration_seconds metric):
//   decode     image bytes or tensor -> pixels, checks
//   featurize  per-checkpoint query gradients (without their projection)
//   project    the random projection of those gradients
//   queue      waiting for the request's batch to start
//   score      the batch's scan with its top-k/bottom-k selection (shared by
//              every query of the batch)
//   select     ranking metadata, breakdowns and thumbnails of the response
// featurize and project are reported as 0 for precomputed vectors.
//
// Thread safety: every method may be called from any number of threads.
#ifndef RETRACE_SERVER_SERVICE_ENGINE_H_
#define RETRACE_SERVER_SERVICE_ENGINE_H_

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "retrace/v1/attribution.pb.h"
#include "common/clock.h"
#include "server/metrics/metrics.h"
#include "server/scoring/query_plan.h"
#include "server/service/batcher.h"
#include "server/service/query_featurizer.h"
#include "server/service/training_images.h"
#include "server/store/store_reader.h"

namespace retrace::service {

inline constexpr int32_t kDefaultTopK = 10;
inline constexpr int32_t kMaxTopK = 4096;
inline constexpr int32_t kDefaultQueryTimesteps = 2;
inline constexpr int32_t kDefaultNoiseDraws = 4;
// Upper bounds of the query-side work one request may ask for.
inline constexpr int32_t kMaxQueryTimesteps = 64;
inline constexpr int32_t kMaxNoiseDraws = 64;
inline constexpr int32_t kDefaultPageSize = 100;
inline constexpr int32_t kMaxPageSize = 10000;
// The longest request_id taken (it is echoed in responses and logs).
inline constexpr size_t kMaxRequestIdBytes = 256;
// The largest magnitude of a precomputed query vector's value: with fp16
// store values (at most 65504) and D up to 65536, no score can overflow.
inline constexpr float kMaxQueryVectorValue = 1e18f;

// What the engine works with. Every pointer must outlive the engine;
// featurizer, images and metrics may be null (no image input, no thumbnails,
// no metrics). Deadlines are checked against `clock`, which should be the
// batcher's.
struct EngineParts {
  const store::StoreReader* store = nullptr;
  scoring::StoreShape shape;
  std::string backend;  // "cpu" or "cuda"
  Batcher* batcher = nullptr;
  QueryFeaturizer* featurizer = nullptr;
  const TrainingImages* images = nullptr;
  metrics::Metrics* metrics = nullptr;
  Clock* clock = Clock::Real();
};

class AttributionEngine {
 public:
  explicit AttributionEngine(EngineParts parts);

  // Errors (docs/api.md, "Errors"), each message naming the problem:
  //   InvalidArgument: no input, undecodable image, wrong shape, NaN/Inf,
  //     k out of range, unknown method/checkpoint/bucket, REPLAY without a
  //     replay slot, query vectors for another store or of the wrong size.
  //   FailedPrecondition: image input on a server without a model, or
  //     thumbnails on a server without the training images.
  //   ResourceExhausted: the scoring queue is full; DeadlineExceeded.
  absl::StatusOr<v1::AttributeResponse> Attribute(
      const v1::AttributeRequest& request, absl::Time deadline);

  // Samples ranked by self-influence, highest first (ties: lower index).
  // InvalidArgument for a bad method, page size or page token.
  absl::StatusOr<v1::SelfInfluenceResponse> SelfInfluence(
      const v1::SelfInfluenceRequest& request);

  v1::StoreInfo StoreInfo() const;

 private:
  absl::StatusOr<scoring::BucketQuery> QueryVectors(
      const v1::AttributeRequest& request, absl::Time deadline,
      v1::AttributeResponse* response);
  absl::StatusOr<scoring::BucketQuery> FromImage(
      const QueryImage& image, const v1::AttributeRequest& request,
      absl::Time deadline, v1::AttributeResponse* response);
  absl::Status FillSample(const scoring::RankedSample& ranked, int32_t rank,
                          bool thumbnails, v1::AttributedSample* out) const;
  void AddTiming(absl::string_view stage, metrics::Stage metric, double seconds,
                 v1::AttributeResponse* response) const;
  const std::vector<int64_t>& SelfInfluenceOrder(int column);

  const EngineParts parts_;
  std::once_flag self_influence_once_[2];
  std::vector<int64_t> self_influence_order_[2];  // TracIn, ReTrac
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_ENGINE_H_

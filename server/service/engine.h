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
#include "common/clock.h"
#include "retrace/v1/attribution.pb.h"
#include "server/metrics/metrics.h"
#include "server/scoring/query_plan.h"
#include "server/service/batcher.h"
#include "server/service/query_featurizer.h"
#include "server/service/query_input.h"
#include "server/service/serving_engine.h"
#include "server/service/training_images.h"
#include "server/store/store_reader.h"

namespace retrace::service {

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

class AttributionEngine final : public ServingEngine {
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
      const v1::AttributeRequest& request, absl::Time deadline) override;

  // Samples ranked by self-influence, highest first (ties: lower index).
  // InvalidArgument for a bad method, page size or page token.
  absl::StatusOr<v1::SelfInfluenceResponse> SelfInfluence(
      const v1::SelfInfluenceRequest& request, absl::Time deadline) override;

  absl::StatusOr<v1::StoreInfo> StoreInfo(
      const v1::GetStoreInfoRequest& request) const override;

 private:
  absl::Status FillSample(const scoring::RankedSample& ranked, int32_t rank,
                          bool thumbnails, v1::AttributedSample* out) const;
  const std::vector<int64_t>& SelfInfluenceOrder(int column);

  const EngineParts parts_;
  const QueryInput input_;
  std::once_flag self_influence_once_[2];
  std::vector<int64_t> self_influence_order_[2];  // TracIn, ReTrac
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_ENGINE_H_

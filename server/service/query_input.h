// What every engine (a server's own, a router's) does with an
// AttributeRequest before it is scored: the checks that need no work, and
// the query vectors, featurized from an image or tensor or taken as sent.
//
// Thread safety: QueryInput is immutable after construction; any number of
// threads may call it.
#ifndef RETRACE_SERVER_SERVICE_QUERY_INPUT_H_
#define RETRACE_SERVER_SERVICE_QUERY_INPUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "retrace/v1/attribution.pb.h"
#include "server/metrics/metrics.h"
#include "server/scoring/query_plan.h"
#include "server/scoring/scorer.h"
#include "server/service/query_featurizer.h"

namespace retrace::service {

inline constexpr int32_t kDefaultTopK = 10;
inline constexpr int32_t kMaxTopK = 4096;
inline constexpr int32_t kDefaultQueryTimesteps = 2;
inline constexpr int32_t kDefaultNoiseDraws = 4;
// Upper bounds of the query-side work one request may ask for.
inline constexpr int32_t kMaxQueryTimesteps = 64;
inline constexpr int32_t kMaxNoiseDraws = 64;
// The longest request_id taken (it is echoed in responses and logs).
inline constexpr size_t kMaxRequestIdBytes = 256;
// The largest magnitude of a precomputed query vector's value: with fp16
// store values (at most 65504) and D up to 65536, no score can overflow.
inline constexpr float kMaxQueryVectorValue = 1e18f;

// A request that passed CheckAttributeRequest: the methods to answer, in
// request order without repeats, and the query without its vectors (plan,
// k, opponents, breakdown).
struct CheckedRequest {
  std::vector<v1::Method> methods;
  scoring::ScoreQuery query;
};

// request_id length, top_k (1..min(kMaxTopK, num_samples)), methods, pairing
// (REPLAY needs a replay slot), checkpoint and bucket filters against the
// store's shape. InvalidArgument naming the field.
absl::StatusOr<CheckedRequest> CheckAttributeRequest(
    const v1::AttributeRequest& request, const scoring::StoreShape& shape,
    int64_t num_samples);

inline constexpr int32_t kDefaultPageSize = 100;
inline constexpr int32_t kMaxPageSize = 10000;

// A SelfInfluence request's listing: column 0 (TracIn) or 1 (ReTrac, the
// default) of the stored self-influence, and the page size.
struct SelfInfluencePage {
  int column = 1;
  int32_t page_size = kDefaultPageSize;
};

// InvalidArgument for an unknown method or a page size outside
// 1..kMaxPageSize. The page token is the engine's to check.
absl::StatusOr<SelfInfluencePage> CheckSelfInfluenceRequest(
    const v1::SelfInfluenceRequest& request);

// DeadlineExceeded "the deadline passed before <before>" once `clock` has
// reached `deadline`.
absl::Status CheckDeadline(const Clock& clock, absl::Time deadline,
                           absl::string_view before);

// The featurizer and metrics may be null (vectors only; no metrics). Every
// pointer must outlive the QueryInput.
struct QueryInputParts {
  scoring::StoreShape shape;
  std::string store_id;
  QueryFeaturizer* featurizer = nullptr;
  metrics::Metrics* metrics = nullptr;
  Clock* clock = Clock::Real();
};

class QueryInput {
 public:
  explicit QueryInput(QueryInputParts parts);

  // The request's query vectors. Adds the decode, featurize and project
  // timings to `response` (featurize and project are 0 for precomputed
  // vectors). InvalidArgument for a missing or bad input (naming the field),
  // FailedPrecondition for an image without a model, DeadlineExceeded.
  absl::StatusOr<scoring::BucketQuery> Vectors(
      const v1::AttributeRequest& request, absl::Time deadline,
      v1::AttributeResponse* response) const;

  // Appends a stage's time to `response` and observes it in the metrics.
  void AddTiming(absl::string_view stage, metrics::Stage metric, double seconds,
                 v1::AttributeResponse* response) const;

 private:
  absl::StatusOr<scoring::BucketQuery> FromImage(
      const QueryImage& image, const v1::AttributeRequest& request,
      absl::Time deadline, v1::AttributeResponse* response) const;

  const QueryInputParts parts_;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_QUERY_INPUT_H_

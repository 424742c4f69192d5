// retrace.v1.Attribution over gRPC: authentication, admission (loading,
// draining, the concurrency limit), deadlines, metrics and the conversion of
// the engine's absl::Status to the wire. The work itself is the engine's.
//
// Until SetEngine is called (while retraced loads the store and the model)
// and after StartDraining, calls get UNAVAILABLE. Health and reflection are
// separate services and need no token, so that load balancers and generic
// tools can reach them.
//
// Thread safety: gRPC calls the handlers from many threads; SetEngine and
// StartDraining may be called from any thread.
#ifndef RETRACE_SERVER_SERVICE_ATTRIBUTION_SERVICE_H_
#define RETRACE_SERVER_SERVICE_ATTRIBUTION_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "retrace/v1/attribution.grpc.pb.h"
#include "server/metrics/metrics.h"
#include "server/service/serving_engine.h"

namespace retrace::service {

struct ServiceOptions {
  // Requests being processed at once (an AttributeStream counts each of its
  // requests); RESOURCE_EXHAUSTED beyond.
  int32_t max_concurrent = 64;
  // Accepted bearer tokens; empty: no authentication.
  std::vector<std::string> tokens;
};

// Reads a token file: one token per line; blank lines and lines starting
// with '#' are ignored, surrounding whitespace is trimmed. NotFound /
// InvalidArgument (no token in the file) naming the path.
absl::StatusOr<std::vector<std::string>> LoadTokenFile(const std::string& path);

class AttributionService final : public v1::Attribution::Service {
 public:
  // `metrics` may be null; it must outlive the service.
  AttributionService(ServiceOptions options, metrics::Metrics* metrics);

  // The engine must outlive the service (or StartDraining and the end of
  // every call must come first).
  void SetEngine(ServingEngine* engine);
  void StartDraining();

  grpc::Status Attribute(grpc::ServerContext* context,
                         const v1::AttributeRequest* request,
                         v1::AttributeResponse* response) override;
  grpc::Status AttributeStream(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::AttributeStreamResponse,
                               v1::AttributeRequest>* stream) override;
  grpc::Status SelfInfluence(grpc::ServerContext* context,
                             const v1::SelfInfluenceRequest* request,
                             v1::SelfInfluenceResponse* response) override;
  grpc::Status GetStoreInfo(grpc::ServerContext* context,
                            const v1::GetStoreInfoRequest* request,
                            v1::StoreInfo* response) override;

 private:
  class Admission;
  // UNAVAILABLE while loading/draining, UNAUTHENTICATED without a valid
  // token; returns the engine otherwise.
  absl::StatusOr<ServingEngine*> Gate(grpc::ServerContext* context) const;
  absl::Status Authenticate(grpc::ServerContext* context) const;
  absl::StatusOr<v1::AttributeResponse> AttributeOne(
      grpc::ServerContext* context, ServingEngine* engine,
      const v1::AttributeRequest& request);
  grpc::Status Finish(absl::string_view method, absl::Time start,
                      const absl::Status& status);

  const ServiceOptions options_;
  metrics::Metrics* const metrics_;
  std::atomic<ServingEngine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<int32_t> in_flight_{0};
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_ATTRIBUTION_SERVICE_H_

// What the gRPC service serves: the three calls of retrace.v1.Attribution
// without the wire. A server's own engine (engine.h: its store, scan and
// model) and a router's (server/router: the shards behind it) both are one.
//
// Thread safety: every method may be called from any number of threads.
#ifndef RETRACE_SERVER_SERVICE_SERVING_ENGINE_H_
#define RETRACE_SERVER_SERVICE_SERVING_ENGINE_H_

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "retrace/v1/attribution.pb.h"

namespace retrace::service {

class ServingEngine {
 public:
  virtual ~ServingEngine() = default;

  virtual absl::StatusOr<v1::AttributeResponse> Attribute(
      const v1::AttributeRequest& request, absl::Time deadline) = 0;
  virtual absl::StatusOr<v1::SelfInfluenceResponse> SelfInfluence(
      const v1::SelfInfluenceRequest& request, absl::Time deadline) = 0;
  virtual absl::StatusOr<v1::StoreInfo> StoreInfo(
      const v1::GetStoreInfoRequest& request) const = 0;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_SERVING_ENGINE_H_

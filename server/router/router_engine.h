// The engine of `retraced --role router`: no store vectors of its own; it
// checks a request as a single server would, featurizes it once (when it has
// the model), sends the projected query to every shard in parallel and
// merges their rankings into exactly what one server holding the whole store
// returns: the same samples, scores bit for bit (a sample's score does not
// depend on how the store is split), ranks over the whole store, ties by the
// lower global index, NaN last, with breakdowns, labels and thumbnails as the
// shards fill them.
//
// Faults. A shard that fails, is slower than shard_timeout, or answers for
// another store makes the request fail with UNAVAILABLE naming the shard and
// its samples; with AttributeRequest.allow_partial the others' merged answer
// comes back instead, with the missing ranges in missing_ranges. A shard's
// RESOURCE_EXHAUSTED (its queue is full) and FAILED_PRECONDITION (e.g. no
// training images for thumbnails) reach the client as they are, prefixed
// with the shard; DEADLINE_EXCEEDED when the client's own deadline passed.
//
// Self-influence pages are merged the same way; the router's page token holds
// each shard's position, so a page costs page_size samples per shard.
//
// Readiness: Watch() re-resolves the shards' addresses and asks each for its
// StoreInfo; when any is down or the addresses changed, it reports not ready
// until a new discovery succeeds (retraced's health then says NOT_SERVING).
//
// Thread safety: every method may be called from any number of threads.
#ifndef RETRACE_SERVER_ROUTER_ROUTER_ENGINE_H_
#define RETRACE_SERVER_ROUTER_ROUTER_ENGINE_H_

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "retrace/v1/attribution.pb.h"
#include "server/metrics/metrics.h"
#include "server/router/shard_set.h"
#include "server/scoring/query_plan.h"
#include "server/service/query_featurizer.h"
#include "server/service/query_input.h"
#include "server/service/serving_engine.h"

namespace retrace::router {

struct RouterOptions {
  // ResolveShardAddresses' spec: "host:port,..." or "dns:///name:port".
  std::string shards;
  ShardConnection connection;
  // The longest a shard may take for one call; the client's deadline, when
  // earlier, wins.
  absl::Duration shard_timeout = absl::Seconds(10);
};

class RouterEngine final : public service::ServingEngine {
 public:
  // `topology` from DiscoverShards. featurizer (built for
  // topology.manifest) and metrics may be null; both must outlive the
  // engine.
  RouterEngine(RouterOptions options, ShardTopology topology,
               service::QueryFeaturizer* featurizer, metrics::Metrics* metrics,
               Clock* clock = Clock::Real());

  absl::StatusOr<v1::AttributeResponse> Attribute(
      const v1::AttributeRequest& request, absl::Time deadline) override;
  absl::StatusOr<v1::SelfInfluenceResponse> SelfInfluence(
      const v1::SelfInfluenceRequest& request, absl::Time deadline) override;
  absl::StatusOr<v1::StoreInfo> StoreInfo(
      const v1::GetStoreInfoRequest& request) const override;

  // One readiness check (see above): OK when every shard answered for the
  // same store and ranges; else the reason, naming the shard.
  absl::Status Watch(absl::Time deadline);

  // The shards now in use.
  std::vector<Shard> shards() const;

 private:
  std::shared_ptr<const ShardTopology> topology() const;
  // The error of a failed shard call, as the client should see it.
  absl::Status ShardError(const Shard& shard, const absl::Status& status,
                          absl::Time deadline) const;

  const RouterOptions options_;
  const scoring::StoreShape shape_;
  service::QueryFeaturizer* const featurizer_;
  metrics::Metrics* const metrics_;
  Clock* const clock_;
  const service::QueryInput input_;

  mutable std::mutex mutex_;
  std::shared_ptr<const ShardTopology> topology_;  // guarded by mutex_
};

// The StoreShape a manifest describes (what the scan of its store checks
// queries against).
scoring::StoreShape ShapeOf(const store::Manifest& manifest);

}  // namespace retrace::router

#endif  // RETRACE_SERVER_ROUTER_ROUTER_ENGINE_H_

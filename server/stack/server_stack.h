// The whole serving stack of one process, built from a ServerConfig: metrics
// (and their HTTP endpoint), the gRPC server with health and reflection, the
// store, the scorer, the query featurizer, the training images for
// thumbnails, the batcher, the engine and the service. retraced runs it; the
// service tests and the server benchmark run the same one in-process, so
// they test what retraced serves.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<ServerStack> stack,
//                    ServerStack::Create(config));  // listening, loaded
//   stack->Start();                                 // health SERVING
//   ...SIGTERM...
//   stack->Shutdown(absl::Seconds(config.drain_timeout_s));
//
// Create starts the metrics endpoint and the gRPC server first (health
// NOT_SERVING, calls UNAVAILABLE "loading"), writes the port file, then loads
// the store and the model; a failure shuts down what was started and is
// returned:
//   InvalidArgument     bad options (batching, TLS files, token file,
//                       message size, device names).
//   Unavailable         the gRPC address or the metrics port cannot be bound.
//   FailedPrecondition  --featurize-device cuda without CUDA (before the store
//                       is read); a model that does not match the store.
//   Errors of StoreReader::Open, Scorer::Create and the featurizer's Create
//   for the store and the model. Missing training images are not an error:
//   the stack serves without thumbnails and logs why.
//
// Thread safety: Start (once) and Shutdown (the first call acts, later ones
// return at once) may be called from any thread, and so may the accessors
// while the stack lives.
#ifndef RETRACE_SERVER_STACK_SERVER_STACK_H_
#define RETRACE_SERVER_STACK_SERVER_STACK_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "server/metrics/metrics.h"
#include "server/router/router_engine.h"
#include "server/scoring/scorer.h"
#include "server/service/attribution_service.h"
#include "server/service/batcher.h"
#include "server/service/engine.h"
#include "server/service/grpc_server.h"
#include "server/service/query_featurizer.h"
#include "server/service/training_images.h"
#include "server/stack/server_config.h"
#include "server/store/store_reader.h"

namespace prometheus {
class Registry;
}  // namespace prometheus

namespace retrace::stack {

// What a test or a benchmark changes beyond the configuration. retraced uses
// the defaults.
struct StackOverrides {
  // The batcher's and the engine's time (queue delay, deadlines). Must
  // outlive the stack.
  Clock* clock = Clock::Real();
  // Wraps the model's featurizer (to slow it down or hold it); it receives
  // the model's, which it must not outlive. Null: the model's as it is.
  std::function<std::unique_ptr<service::QueryFeaturizer>(
      service::QueryFeaturizer*)>
      wrap_featurizer;
};

class ServerStack {
 public:
  static absl::StatusOr<std::unique_ptr<ServerStack>> Create(
      const ServerConfig& config, StackOverrides overrides = {});
  // Shuts down without draining unless Shutdown came first.
  ~ServerStack();
  ServerStack(const ServerStack&) = delete;
  ServerStack& operator=(const ServerStack&) = delete;

  // Hands the engine to the service: health SERVING, metrics ready.
  void Start();
  // Metrics not ready, health NOT_SERVING, new calls refused; calls in
  // flight get up to `drain` to finish, the rest are cancelled. Returns when
  // every handler has returned.
  void Shutdown(absl::Duration drain);

  // The bound gRPC port.
  int port() const { return server_->port(); }
  // The bound metrics port; -1 without an endpoint (metrics_port -1).
  int metrics_port() const;

  const ServerConfig& config() const { return config_; }
  metrics::Metrics& metrics() { return *metrics_; }
  // Roles single and shard only (a router has no store).
  const store::StoreReader& store() const { return *store_; }
  scoring::Scorer& scorer() { return *scorer_; }
  // Role router only.
  router::RouterEngine& router() { return *router_; }
  // What the engine featurizes with (the wrapper when there is one); null
  // without a model.
  service::QueryFeaturizer* featurizer() const { return featurizer_; }
  // Roles single and shard only.
  service::AttributionEngine& engine() { return *engine_; }
  service::AttributionService& service() { return *service_; }
  service::GrpcServer& server() { return *server_; }

 private:
  ServerStack(const ServerConfig& config, StackOverrides overrides);
  absl::Status Listen();
  absl::Status Load();
  absl::Status LoadRouter();
  // Role router: re-checks the shards every kWatchInterval and says
  // NOT_SERVING while one is down.
  void WatchShards();

  const ServerConfig config_;
  const StackOverrides overrides_;
  // Declared in the order they are needed, so that each part is destroyed
  // before what it uses; the server is shut down (in the destructor at the
  // latest) before anything it calls into goes.
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<metrics::Metrics> metrics_;
  std::unique_ptr<metrics::MetricsEndpoint> endpoint_;
  std::unique_ptr<store::StoreReader> store_;
  std::unique_ptr<scoring::Scorer> scorer_;
  std::unique_ptr<service::QueryFeaturizer> model_featurizer_;
  std::unique_ptr<service::QueryFeaturizer> wrapped_featurizer_;
  service::QueryFeaturizer* featurizer_ = nullptr;
  std::unique_ptr<service::TrainingImages> images_;
  std::unique_ptr<service::Batcher> batcher_;
  std::unique_ptr<service::AttributionEngine> engine_;
  std::unique_ptr<router::RouterEngine> router_;
  service::ServingEngine* serving_ = nullptr;  // engine_ or router_
  std::unique_ptr<service::AttributionService> service_;
  std::unique_ptr<service::GrpcServer> server_;
  std::once_flag shutdown_once_;
  std::mutex watch_mutex_;
  std::condition_variable watch_stop_;
  bool stopping_ = false;  // guarded by watch_mutex_
  std::thread watcher_;
};

}  // namespace retrace::stack

#endif  // RETRACE_SERVER_STACK_SERVER_STACK_H_

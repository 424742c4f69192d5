// The one Metrics object of retraced and the HTTP endpoint that serves it.
//
//   auto registry = std::make_shared<prometheus::Registry>();
//   metrics::Metrics metrics(*registry);          // registers every family
//   ASSIGN_OR_RETURN(auto endpoint,
//                    metrics::MetricsEndpoint::Start("0.0.0.0:9090",
//                    registry));
//   metrics.CountRequest("Attribute", "OK");
//   metrics.ObserveStage(metrics::Stage::kScore, 0.012);
//
// Every family is registered when Metrics is constructed, with a fixed name
// whose suffix is its unit (Prometheus' naming rules):
//
//   retrace_requests_total{method,code}           counter
//   retrace_request_duration_seconds{method}      histogram, kLatencyBuckets
//   retrace_stage_duration_seconds{stage}         histogram, kLatencyBuckets
//   retrace_batch_size_queries                    histogram, 1,2,4,...,64
//   retrace_queue_depth_queries                   gauge
//   retrace_requests_in_flight                    gauge
//   retrace_store_samples, retrace_store_bytes    gauges
//   retrace_device_memory_bytes                   gauge (0 on the CPU backend)
//   retrace_ready                                 gauge, 1 while serving
//   retrace_router_shard_requests_total{shard,code}   counter (a router's
//                                                      calls to its shards)
//   retrace_router_shard_latency_seconds{shard}       histogram,
//                                                      kLatencyBuckets
//
// The six stage series exist (at zero) from construction; the per-method and
// per-code series appear at their first use (and with them the two families,
// which prometheus-cpp leaves out of expositions while they are empty). Label
// values must come from small fixed sets (gRPC method names, gRPC code names):
// every distinct value is a new time series that lives as long as the registry.
//
// Thread safety: every method of Metrics may be called from any thread at any
// time. Counters and gauges are atomics; a histogram observation takes that
// series' own short lock (prometheus-cpp); the first use of a new method or
// code takes a writer lock once to create its series, later uses a reader
// lock. MetricsEndpoint is immutable
// after Start; destroying it stops the HTTP server and joins its thread
// (within milliseconds).
//
// Errors: Metrics never fails once constructed. Its constructor throws
// std::invalid_argument (from prometheus-cpp) only when `registry` already
// holds a family of the same name with a different type or help text, a
// programming error. MetricsEndpoint::Start returns UNAVAILABLE naming the
// address when it cannot listen there.
#ifndef RETRACE_SERVER_METRICS_METRICS_H_
#define RETRACE_SERVER_METRICS_METRICS_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace retrace::metrics {

// The stages of one query, in the order it passes them. kQueue is the time a
// projected query waits for its batch to be scored.
enum class Stage { kDecode, kFeaturize, kProject, kQueue, kScore, kSelect };
inline constexpr int kNumStages = 6;

// The `stage` label value: "decode", "featurize", "project", "queue",
// "score", "select".
absl::string_view StageName(Stage stage);

// Upper bounds, in seconds, of the latency histograms' buckets: 100 µs
// doubling up to 52.4 s (20 buckets, then +Inf). A factor of two keeps the
// error of an estimated quantile under 2x across the whole range, from a
// decode of a small PNG to a full-store scan on the CPU backend.
inline constexpr int kNumLatencyBuckets = 20;
inline constexpr double kFirstLatencyBucketSeconds = 1e-4;
prometheus::Histogram::BucketBoundaries LatencyBucketsSeconds();

// Upper bounds of the batch-size histogram's buckets: 1, 2, 4, ..., 64.
prometheus::Histogram::BucketBoundaries BatchSizeBuckets();

class Metrics {
 public:
  // Registers every metric family on `registry`, which must outlive this
  // object. Two Metrics on one registry share the same series.
  explicit Metrics(prometheus::Registry& registry);

  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // retrace_requests_total{method="Attribute",code="OK"} += 1. `code` is the
  // gRPC code name ("OK", "INVALID_ARGUMENT", ...).
  void CountRequest(absl::string_view method, absl::string_view code);
  // The same with the code of a Status (absl's code names are gRPC's).
  void CountRequest(absl::string_view method, absl::StatusCode code);

  // retrace_request_duration_seconds{method}: the whole call, in seconds.
  void ObserveRequest(absl::string_view method, double seconds);

  // retrace_stage_duration_seconds{stage}: one query's time in `stage`.
  void ObserveStage(Stage stage, double seconds);

  // retrace_batch_size_queries: queries scored together in one store scan.
  void ObserveBatchSize(int64_t queries);

  // retrace_queue_depth_queries: projected queries waiting for a batch.
  void SetQueueDepth(int64_t queries);

  // retrace_requests_in_flight += delta (+1 when a call starts, -1 when it
  // ends).
  void AddInFlight(int64_t delta);

  // retrace_store_samples and retrace_store_bytes: the opened store's size.
  void SetStore(int64_t samples, int64_t bytes);

  // retrace_device_memory_bytes: device memory in use (0 on the CPU backend).
  void SetDeviceMemory(int64_t bytes);

  // retrace_ready: 1 while serving, 0 while loading or draining.
  void SetReady(bool ready);

  // A router's call to one shard (by address): counted by gRPC code name,
  // its time observed.
  void ObserveShardCall(absl::string_view shard, absl::string_view code,
                        double seconds);

 private:
  prometheus::Counter& RequestCounter(absl::string_view method,
                                      absl::string_view code);
  prometheus::Histogram& RequestDuration(absl::string_view method);

  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& request_duration_;
  std::array<prometheus::Histogram*, kNumStages> stage_duration_;
  prometheus::Histogram& batch_size_;
  prometheus::Gauge& queue_depth_;
  prometheus::Gauge& in_flight_;
  prometheus::Gauge& store_samples_;
  prometheus::Gauge& store_bytes_;
  prometheus::Gauge& device_memory_;
  prometheus::Gauge& ready_;
  prometheus::Family<prometheus::Counter>& shard_requests_;
  prometheus::Family<prometheus::Histogram>& shard_latency_;

  // Children already created, so that the hot path neither allocates a
  // histogram nor takes the family's lock. Keyed by "method" and
  // "method\ncode"; the pointers are owned by the families.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, prometheus::Counter*> request_counters_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, prometheus::Histogram*> request_durations_
      ABSL_GUARDED_BY(mu_);
};

// Serves a registry in Prometheus' text format at http://<address>/metrics.
class MetricsEndpoint {
 public:
  // Listens on `address`: "ip:port" ("127.0.0.1:9090", "[::1]:9090",
  // "0.0.0.0:9090") or a bare port for every interface; port 0 picks a free
  // one (see port()). Host names are not resolved. The endpoint keeps
  // `registry` alive. UNAVAILABLE naming the address when it cannot bind;
  // INVALID_ARGUMENT for an empty address or a null registry.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address,
      std::shared_ptr<prometheus::Registry> registry);

  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // The port actually bound.
  int port() const { return port_; }

 private:
  MetricsEndpoint(std::shared_ptr<prometheus::Registry> registry, int listen_fd,
                  int stop_fd, int port);

  // Accepts and answers connections one at a time until stop_fd_ becomes
  // readable.
  void Serve();
  void ServeConnection(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_;
  // An eventfd the destructor signals; every wait of the server thread also
  // polls it, so stopping takes no longer than the current write.
  int stop_fd_;
  int port_;
  std::thread thread_;
};

}  // namespace retrace::metrics

#endif  // RETRACE_SERVER_METRICS_METRICS_H_

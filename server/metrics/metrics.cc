#include "server/metrics/metrics.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"

namespace retrace::metrics {
namespace {

constexpr std::array<Stage, kNumStages> kAllStages = {
    Stage::kDecode, Stage::kFeaturize, Stage::kProject,
    Stage::kQueue,  Stage::kScore,     Stage::kSelect};

prometheus::Gauge& AddGauge(prometheus::Registry& registry,
                            const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add(
      {});
}

// The host to connect to in order to reach a server listening on `address`
// ("ip:port", "[ip6]:port" or a bare port): the address itself, or loopback
// for a wildcard.
std::string WakeHost(const std::string& address) {
  const size_t colon = address.rfind(':');
  std::string host = colon == std::string::npos ? "" : address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host.empty() || host == "0.0.0.0") return "127.0.0.1";
  if (host == "::") return "::1";
  return host;
}

// Opens and closes one TCP connection to host:port, ignoring every error.
void PokeListener(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  addrinfo* addresses = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints,
                  &addresses) != 0) {
    return;
  }
  const int fd =
      socket(addresses->ai_family, addresses->ai_socktype | SOCK_CLOEXEC,
             addresses->ai_protocol);
  if (fd >= 0) {
    const timeval timeout = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    connect(fd, addresses->ai_addr, addresses->ai_addrlen);
    close(fd);
  }
  freeaddrinfo(addresses);
}

}  // namespace

absl::string_view StageName(Stage stage) {
  switch (stage) {
    case Stage::kDecode:
      return "decode";
    case Stage::kFeaturize:
      return "featurize";
    case Stage::kProject:
      return "project";
    case Stage::kQueue:
      return "queue";
    case Stage::kScore:
      return "score";
    case Stage::kSelect:
      return "select";
  }
  return "unknown";
}

prometheus::Histogram::BucketBoundaries LatencyBucketsSeconds() {
  prometheus::Histogram::BucketBoundaries bounds;
  bounds.reserve(kNumLatencyBuckets);
  double bound = kFirstLatencyBucketSeconds;
  for (int i = 0; i < kNumLatencyBuckets; ++i, bound *= 2) {
    bounds.push_back(bound);
  }
  return bounds;
}

prometheus::Histogram::BucketBoundaries BatchSizeBuckets() {
  return {1, 2, 4, 8, 16, 32, 64};
}

Metrics::Metrics(prometheus::Registry& registry)
    : requests_(prometheus::BuildCounter()
                    .Name("retrace_requests_total")
                    .Help("RPCs completed, by method and gRPC status code.")
                    .Register(registry)),
      request_duration_(
          prometheus::BuildHistogram()
              .Name("retrace_request_duration_seconds")
              .Help("Time from receiving an RPC to sending its response, in "
                    "seconds, by method.")
              .Register(registry)),
      batch_size_(prometheus::BuildHistogram()
                      .Name("retrace_batch_size_queries")
                      .Help("Projected queries scored together in one scan "
                            "of the store.")
                      .Register(registry)
                      .Add({}, BatchSizeBuckets())),
      queue_depth_(AddGauge(registry, "retrace_queue_depth_queries",
                            "Projected queries waiting to be batched.")),
      in_flight_(AddGauge(registry, "retrace_requests_in_flight",
                          "RPCs being served now.")),
      store_samples_(AddGauge(registry, "retrace_store_samples",
                              "Training samples in the opened store.")),
      store_bytes_(AddGauge(registry, "retrace_store_bytes",
                            "Size of the opened store's shards, in bytes.")),
      device_memory_(AddGauge(registry, "retrace_device_memory_bytes",
                              "Accelerator memory in use, in bytes (0 on the "
                              "CPU backend).")),
      ready_(AddGauge(registry, "retrace_ready",
                      "1 while the server accepts requests, 0 while it "
                      "loads or drains.")) {
  auto& stages = prometheus::BuildHistogram()
                     .Name("retrace_stage_duration_seconds")
                     .Help("Time one query spends in each stage, in seconds.")
                     .Register(registry);
  for (Stage stage : kAllStages) {
    stage_duration_[static_cast<int>(stage)] = &stages.Add(
        {{"stage", std::string(StageName(stage))}}, LatencyBucketsSeconds());
  }
}

prometheus::Counter& Metrics::RequestCounter(absl::string_view method,
                                             absl::string_view code) {
  const std::string key = absl::StrCat(method, "\n", code);
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = request_counters_.find(key);
    if (it != request_counters_.end()) return *it->second;
  }
  absl::MutexLock lock(&mu_);
  // Family::Add returns the existing child when another Metrics on the same
  // registry, or a thread that won the race for mu_, created it first.
  prometheus::Counter*& counter = request_counters_[key];
  if (counter == nullptr) {
    counter = &requests_.Add(
        {{"method", std::string(method)}, {"code", std::string(code)}});
  }
  return *counter;
}

prometheus::Histogram& Metrics::RequestDuration(absl::string_view method) {
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = request_durations_.find(method);
    if (it != request_durations_.end()) return *it->second;
  }
  absl::MutexLock lock(&mu_);
  prometheus::Histogram*& histogram = request_durations_[method];
  if (histogram == nullptr) {
    histogram = &request_duration_.Add({{"method", std::string(method)}},
                                       LatencyBucketsSeconds());
  }
  return *histogram;
}

void Metrics::CountRequest(absl::string_view method, absl::string_view code) {
  RequestCounter(method, code).Increment();
}

void Metrics::CountRequest(absl::string_view method, absl::StatusCode code) {
  CountRequest(method, absl::StatusCodeToString(code));
}

void Metrics::ObserveRequest(absl::string_view method, double seconds) {
  RequestDuration(method).Observe(seconds);
}

void Metrics::ObserveStage(Stage stage, double seconds) {
  stage_duration_[static_cast<int>(stage)]->Observe(seconds);
}

void Metrics::ObserveBatchSize(int64_t queries) {
  batch_size_.Observe(static_cast<double>(queries));
}

void Metrics::SetQueueDepth(int64_t queries) {
  queue_depth_.Set(static_cast<double>(queries));
}

void Metrics::AddInFlight(int64_t delta) {
  in_flight_.Increment(static_cast<double>(delta));
}

void Metrics::SetStore(int64_t samples, int64_t bytes) {
  store_samples_.Set(static_cast<double>(samples));
  store_bytes_.Set(static_cast<double>(bytes));
}

void Metrics::SetDeviceMemory(int64_t bytes) {
  device_memory_.Set(static_cast<double>(bytes));
}

void Metrics::SetReady(bool ready) { ready_.Set(ready ? 1.0 : 0.0); }

MetricsEndpoint::MetricsEndpoint(std::unique_ptr<prometheus::Exposer> exposer,
                                 std::shared_ptr<prometheus::Registry> registry,
                                 std::string wake_host, int port)
    : registry_(std::move(registry)),
      exposer_(std::move(exposer)),
      wake_host_(std::move(wake_host)),
      port_(port) {}

MetricsEndpoint::~MetricsEndpoint() {
  // civetweb's listener polls in 2 s slices and only looks at its stop flag
  // between them, so a plain stop takes up to 2 s: too long for a graceful
  // shutdown and for tests that start many servers. Connections wake the
  // poll, so they are made until the stop is complete.
  std::atomic<bool> stopped{false};
  std::thread waker([this, &stopped] {
    while (!stopped.load()) {
      PokeListener(wake_host_, port_);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  exposer_.reset();
  stopped.store(true);
  waker.join();
  // registry_ is released after the exposer has stopped serving it.
}

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address,
    std::shared_ptr<prometheus::Registry> registry) {
  if (address.empty()) {
    return absl::InvalidArgumentError("metrics address is empty");
  }
  if (registry == nullptr) {
    return absl::InvalidArgumentError("metrics registry is null");
  }
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  const std::vector<int> ports = exposer->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": no port bound"));
  }
  exposer->RegisterCollectable(registry);
  return std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint(
      std::move(exposer), std::move(registry), WakeHost(address), ports[0]));
}

}  // namespace retrace::metrics

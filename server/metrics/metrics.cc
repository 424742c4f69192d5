#include "server/metrics/metrics.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

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

// The endpoint is a small HTTP/1.x server of its own rather than
// prometheus-cpp's Exposer: Exposer runs on civetweb, and Debian's civetweb
// starts its threads with a fixed 100 KiB stack (USE_STACK_SIZE). glibc
// places the static TLS of every library loaded at start-up in each thread's
// stack, and retraced's libraries (OpenBLAS, glog, LibTorch, ...) need more
// than that, so civetweb's pthread_create fails with EINVAL (mg_start returns
// NULL after binding) or, a little under the limit, its threads overflow
// their stacks. A scrape is one short GET, which one thread with a normal
// stack answers easily.

// Longest request head read; a scraper sends a few hundred bytes.
constexpr size_t kMaxRequestHead = 16 * 1024;
// How long one connection may take to send its request and take the
// response before it is dropped (connections are served one at a time).
constexpr auto kConnectionTimeout = std::chrono::seconds(5);

absl::Status CannotServe(const std::string& address, absl::string_view why) {
  return absl::UnavailableError(
      absl::StrCat("cannot serve metrics on ", address, ": ", why));
}

// Splits "ip:port", "[ip6]:port" or a bare port (every IPv4 interface) into
// a numeric host and port; false when `address` has neither form.
bool SplitAddress(const std::string& address, std::string* host,
                  std::string* port) {
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find("]:");
    if (close == std::string::npos) return false;
    *host = address.substr(1, close - 1);
    *port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos) {
      *host = "0.0.0.0";
      *port = address;
    } else {
      *host = address.substr(0, colon);
      *port = address.substr(colon + 1);
      if (host->find(':') != std::string::npos) return false;
    }
  }
  if (host->empty() || port->empty() || port->size() > 5) return false;
  for (char c : *port) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return std::stoi(*port) <= 65535;
}

// Milliseconds left until `deadline`, at least 0.
int MillisecondsUntil(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(left.count());
}

// Waits until `fd` has `events`; false on stop, timeout or error.
bool WaitFor(int fd, short events, int stop_fd,
             std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    const int ready = poll(fds, 2, MillisecondsUntil(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0 || fds[1].revents != 0) return false;
    return (fds[0].revents & (events | POLLERR | POLLHUP)) != 0;
  }
}

bool SendAll(int fd, absl::string_view data, int stop_fd,
             std::chrono::steady_clock::time_point deadline) {
  while (!data.empty()) {
    const ssize_t sent = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (sent > 0) {
      data.remove_prefix(static_cast<size_t>(sent));
    } else if (sent < 0 && errno == EINTR) {
      continue;
    } else if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFor(fd, POLLOUT, stop_fd, deadline)) return false;
    } else {
      return false;
    }
  }
  return true;
}

std::string Response(absl::string_view status, absl::string_view content_type,
                     absl::string_view body, bool head_only,
                     absl::string_view extra_headers = "") {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\n",
                      extra_headers, "Connection: close\r\n\r\n",
                      head_only ? "" : body);
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
                      "loads or drains.")),
      shard_requests_(
          prometheus::BuildCounter()
              .Name("retrace_router_shard_requests_total")
              .Help("A router's calls to its shards, by shard address and "
                    "gRPC status code.")
              .Register(registry)),
      shard_latency_(prometheus::BuildHistogram()
                         .Name("retrace_router_shard_latency_seconds")
                         .Help("Time of a router's call to one shard, in "
                               "seconds, by shard address.")
                         .Register(registry)) {
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

void Metrics::ObserveShardCall(absl::string_view shard, absl::string_view code,
                               double seconds) {
  // Family::Add returns the existing child for labels it has seen.
  shard_requests_
      .Add({{"shard", std::string(shard)}, {"code", std::string(code)}})
      .Increment();
  shard_latency_.Add({{"shard", std::string(shard)}}, LatencyBucketsSeconds())
      .Observe(seconds);
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

MetricsEndpoint::MetricsEndpoint(std::shared_ptr<prometheus::Registry> registry,
                                 int listen_fd, int stop_fd, int port)
    : registry_(std::move(registry)),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      port_(port),
      thread_([this] { Serve(); }) {}

MetricsEndpoint::~MetricsEndpoint() {
  const uint64_t one = 1;
  while (write(stop_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
  thread_.join();
  close(listen_fd_);
  close(stop_fd_);
  // registry_ is released after the server has stopped serving it.
}

void MetricsEndpoint::Serve() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    const int ready = poll(fds, 2, -1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0 || fds[1].revents != 0) return;
    const int fd =
        accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors or memory: wait a little (or for the stop)
      // rather than spin on a listener that stays readable.
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
          errno != ECONNABORTED) {
        pollfd stop = {stop_fd_, POLLIN, 0};
        poll(&stop, 1, 100);
      }
      continue;
    }
    ServeConnection(fd);
    close(fd);
  }
}

void MetricsEndpoint::ServeConnection(int fd) {
  const auto deadline = std::chrono::steady_clock::now() + kConnectionTimeout;
  std::string request;
  size_t head_end = std::string::npos;
  while (head_end == std::string::npos) {
    if (request.size() > kMaxRequestHead) {
      SendAll(fd,
              Response("431 Request Header Fields Too Large", "text/plain",
                       "request head too large\n", false),
              stop_fd_, deadline);
      return;
    }
    char buffer[4096];
    const ssize_t received = recv(fd, buffer, sizeof(buffer), 0);
    if (received > 0) {
      request.append(buffer, static_cast<size_t>(received));
      head_end = request.find("\r\n\r\n");
      if (head_end == std::string::npos) head_end = request.find("\n\n");
    } else if (received < 0 && errno == EINTR) {
      continue;
    } else if (received < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFor(fd, POLLIN, stop_fd_, deadline)) return;
    } else {
      return;  // Closed before a whole request head, or an error.
    }
  }

  // "GET /metrics?x=y HTTP/1.1"
  const absl::string_view line =
      absl::string_view(request).substr(0, request.find_first_of("\r\n"));
  const size_t first_space = line.find(' ');
  const size_t second_space = first_space == absl::string_view::npos
                                  ? absl::string_view::npos
                                  : line.find(' ', first_space + 1);
  std::string response;
  if (second_space == absl::string_view::npos ||
      !absl::StartsWith(line.substr(second_space + 1), "HTTP/")) {
    response =
        Response("400 Bad Request", "text/plain", "bad request\n", false);
  } else {
    const absl::string_view method = line.substr(0, first_space);
    absl::string_view path =
        line.substr(first_space + 1, second_space - first_space - 1);
    path = path.substr(0, path.find('?'));
    const bool head_only = method == "HEAD";
    if (path != "/metrics") {
      response =
          Response("404 Not Found", "text/plain", "not found\n", head_only);
    } else if (method != "GET" && !head_only) {
      response =
          Response("405 Method Not Allowed", "text/plain",
                   "method not allowed\n", false, "Allow: GET, HEAD\r\n");
    } else {
      try {
        response = Response(
            "200 OK", "text/plain; version=0.0.4; charset=utf-8",
            prometheus::TextSerializer().Serialize(registry_->Collect()),
            head_only);
      } catch (const std::exception& e) {
        response = Response("500 Internal Server Error", "text/plain",
                            absl::StrCat(e.what(), "\n"), head_only);
      }
    }
  }
  if (!SendAll(fd, response, stop_fd_, deadline)) return;
  // Closing with unread input would reset the connection, and the client
  // could lose the response: end the stream, then drop what it sent.
  shutdown(fd, SHUT_WR);
  char discard[4096];
  while (recv(fd, discard, sizeof(discard), 0) > 0) {
  }
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
  std::string host;
  std::string port;
  if (!SplitAddress(address, &host, &port)) {
    return CannotServe(address, "not ip:port, [ip6]:port or a port number");
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* addresses = nullptr;
  if (const int error =
          getaddrinfo(host.c_str(), port.c_str(), &hints, &addresses);
      error != 0) {
    return CannotServe(address, gai_strerror(error));
  }
  const int fd = socket(addresses->ai_family,
                        addresses->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        addresses->ai_protocol);
  if (fd < 0) {
    const int error = errno;
    freeaddrinfo(addresses);
    return CannotServe(address, std::strerror(error));
  }
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  if (addresses->ai_family == AF_INET6) {
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on));
  }
  const int bound = bind(fd, addresses->ai_addr, addresses->ai_addrlen);
  const int bind_error = errno;
  freeaddrinfo(addresses);
  sockaddr_storage local{};
  socklen_t local_size = sizeof(local);
  if (bound != 0 || listen(fd, SOMAXCONN) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_size) != 0) {
    const int error = bound != 0 ? bind_error : errno;
    close(fd);
    return CannotServe(address, std::strerror(error));
  }
  const int bound_port =
      local.ss_family == AF_INET6
          ? ntohs(reinterpret_cast<const sockaddr_in6*>(&local)->sin6_port)
          : ntohs(reinterpret_cast<const sockaddr_in*>(&local)->sin_port);
  const int stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) {
    const int error = errno;
    close(fd);
    return CannotServe(address, std::strerror(error));
  }
  try {
    return std::unique_ptr<MetricsEndpoint>(
        new MetricsEndpoint(std::move(registry), fd, stop_fd, bound_port));
  } catch (const std::exception& e) {  // std::system_error from std::thread
    close(fd);
    close(stop_fd);
    return CannotServe(address, e.what());
  }
}

}  // namespace retrace::metrics

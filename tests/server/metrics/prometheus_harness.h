// Test helpers that check metrics the way an operator would: a plain HTTP GET
// of an exposition, and Debian's real `prometheus` server started as a child
// process that scrapes loopback targets and answers PromQL queries.
//
//   if (!PrometheusAvailable()) GTEST_SKIP() << kPrometheusBinary << " ...";
//   auto prometheus = PrometheusProcess::Start({"127.0.0.1:9464"});
//   ASSERT_TRUE(prometheus.ok()) << prometheus.status();
//   absl::StatusOr<double> total = WaitForPrometheusScalar(
//       (*prometheus)->port(), "sum(retrace_requests_total)", 2,
//       absl::Seconds(60));
//
// Thread safety: the free functions share no state. A PrometheusProcess is
// owned by one thread; it must be created on a thread that outlives it, since
// the child is killed when the thread that started it exits (so that a test
// killed by a timeout leaves no server behind).
//
// Errors: UNAVAILABLE when a connection fails or an HTTP status is not 200,
// DEADLINE_EXCEEDED when a wait runs out (the message carries the last value
// or error seen and, for the server, the tail of its log), NOT_FOUND when a
// query has no series yet, FAILED_PRECONDITION when it has more than one.
#ifndef RETRACE_TESTS_SERVER_METRICS_PROMETHEUS_HARNESS_H_
#define RETRACE_TESTS_SERVER_METRICS_PROMETHEUS_HARNESS_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace retrace::testing {

inline constexpr char kPrometheusBinary[] = "/usr/bin/prometheus";

// Whether kPrometheusBinary exists and is executable.
bool PrometheusAvailable();

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read
// back, released). Another process may take it before it is used.
absl::StatusOr<int> PickFreePort();

// GET http://host:port/path over HTTP/1.0 and the body of a 200 response.
// `host` is a name or numeric address; `path` starts with '/' and is sent as
// given (escape query values with UrlEncode).
absl::StatusOr<std::string> HttpGet(const std::string& host, int port,
                                    const std::string& path,
                                    absl::Duration timeout = absl::Seconds(5));

// Percent-encodes everything but RFC 3986's unreserved characters.
std::string UrlEncode(const std::string& text);

struct PrometheusOptions {
  std::string binary = kPrometheusBinary;
  // Also the scrape timeout. Whole milliseconds.
  absl::Duration scrape_interval = absl::Seconds(1);
  // How long to wait for /-/ready after the start.
  absl::Duration start_timeout = absl::Seconds(30);
};

// A `prometheus` child process with its own temporary directory (config,
// TSDB, log), listening on a free loopback port and scraping `targets` as
// job "retraced". The destructor stops it (SIGTERM, then SIGKILL after 10 s),
// reaps it and removes the directory.
class PrometheusProcess {
 public:
  // Starts the server and waits until it reports ready. A port taken by
  // another process between picking and binding is retried with a new one.
  static absl::StatusOr<std::unique_ptr<PrometheusProcess>> Start(
      const std::vector<std::string>& targets,
      const PrometheusOptions& options = {});

  ~PrometheusProcess();
  PrometheusProcess(const PrometheusProcess&) = delete;
  PrometheusProcess& operator=(const PrometheusProcess&) = delete;

  // The port of its HTTP API on 127.0.0.1.
  int port() const { return port_; }
  // The last `max_bytes` of its combined stdout and stderr.
  std::string LogTail(size_t max_bytes = 4000) const;

 private:
  PrometheusProcess(std::string work_dir, pid_t pid, int port)
      : work_dir_(std::move(work_dir)), pid_(pid), port_(port) {}

  std::string work_dir_;
  pid_t pid_;
  int port_;
};

// One instant query through /api/v1/query on 127.0.0.1:port: the value of
// its single sample (a scalar result, or a vector of exactly one series).
absl::StatusOr<double> QueryPrometheusScalar(int port,
                                             const std::string& promql);

// Repeats QueryPrometheusScalar every 200 ms until `done(value)` holds, and
// returns that value; DEADLINE_EXCEEDED after `timeout`.
absl::StatusOr<double> WaitForPrometheusScalar(
    int port, const std::string& promql,
    const std::function<bool(double)>& done, absl::Duration timeout);

// The same, waiting for the value `want` exactly.
absl::StatusOr<double> WaitForPrometheusScalar(int port,
                                               const std::string& promql,
                                               double want,
                                               absl::Duration timeout);

}  // namespace retrace::testing

#endif  // RETRACE_TESTS_SERVER_METRICS_PROMETHEUS_HARNESS_H_

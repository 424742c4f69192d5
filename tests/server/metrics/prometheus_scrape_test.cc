// Debian's real Prometheus scrapes a MetricsEndpoint on loopback; the values
// are read back through Prometheus' HTTP API, as a dashboard would.
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "prometheus/registry.h"
#include "server/metrics/metrics.h"
#include "tests/server/metrics/prometheus_harness.h"

namespace retrace::metrics {
namespace {

using ::retrace::testing::PrometheusAvailable;
using ::retrace::testing::PrometheusProcess;
using ::retrace::testing::WaitForPrometheusScalar;

// Generous: a scrape every second normally answers within a few.
constexpr absl::Duration kScrapeTimeout = absl::Seconds(60);

TEST(PrometheusScrapeTest, CounterReadBackThroughPrometheus) {
  if (!PrometheusAvailable()) {
    GTEST_SKIP() << ::retrace::testing::kPrometheusBinary
                 << " is not installed (Debian package prometheus)";
  }
  auto registry = std::make_shared<prometheus::Registry>();
  Metrics metrics(*registry);
  metrics.CountRequest("Attribute", "OK");
  metrics.CountRequest("Attribute", "OK");
  metrics.CountRequest("Attribute", "INVALID_ARGUMENT");
  metrics.ObserveStage(Stage::kScore, 0.003);
  metrics.SetReady(true);
  auto endpoint = MetricsEndpoint::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  const std::string target = absl::StrCat("127.0.0.1:", (*endpoint)->port());

  auto prometheus = PrometheusProcess::Start({target});
  ASSERT_TRUE(prometheus.ok()) << prometheus.status();
  const int port = (*prometheus)->port();
  SCOPED_TRACE(absl::StrCat("target ", target, ", prometheus on port ", port));

  absl::StatusOr<double> ok_count = WaitForPrometheusScalar(
      port, "retrace_requests_total{method=\"Attribute\",code=\"OK\"}", 2,
      kScrapeTimeout);
  ASSERT_TRUE(ok_count.ok()) << ok_count.status() << "\n"
                             << (*prometheus)->LogTail();
  EXPECT_EQ(*ok_count, 2);

  // The same scrape carried the other series.
  absl::StatusOr<double> up =
      WaitForPrometheusScalar(port, "up{job=\"retraced\"}", 1, kScrapeTimeout);
  EXPECT_TRUE(up.ok()) << up.status();
  absl::StatusOr<double> invalid = WaitForPrometheusScalar(
      port, "retrace_requests_total{code=\"INVALID_ARGUMENT\"}", 1,
      kScrapeTimeout);
  EXPECT_TRUE(invalid.ok()) << invalid.status();
  absl::StatusOr<double> score_count = WaitForPrometheusScalar(
      port, "retrace_stage_duration_seconds_count{stage=\"score\"}", 1,
      kScrapeTimeout);
  EXPECT_TRUE(score_count.ok()) << score_count.status();
  absl::StatusOr<double> ready =
      WaitForPrometheusScalar(port, "retrace_ready", 1, kScrapeTimeout);
  EXPECT_TRUE(ready.ok()) << ready.status();

  // A later increment reaches Prometheus with the next scrape.
  for (int i = 0; i < 3; ++i) metrics.CountRequest("Attribute", "OK");
  absl::StatusOr<double> total = WaitForPrometheusScalar(
      port, "sum(retrace_requests_total)", 6, kScrapeTimeout);
  EXPECT_TRUE(total.ok()) << total.status() << "\n" << (*prometheus)->LogTail();
}

}  // namespace
}  // namespace retrace::metrics

// MetricsEndpoint over loopback: the text exposition a scraper receives, and
// the errors of Start.
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "prometheus/registry.h"
#include "server/metrics/metrics.h"
#include "tests/server/metrics/prometheus_harness.h"

namespace retrace::metrics {
namespace {

using ::retrace::testing::HttpGet;

TEST(MetricsEndpointTest, ServesTextExpositionOnAPickedPort) {
  auto registry = std::make_shared<prometheus::Registry>();
  Metrics metrics(*registry);
  metrics.CountRequest("Attribute", "OK");
  metrics.CountRequest("Attribute", "OK");
  metrics.CountRequest("Attribute", "INVALID_ARGUMENT");
  metrics.ObserveStage(Stage::kScore, 0.003);
  metrics.SetStore(60000, 1 << 20);
  metrics.SetReady(true);

  auto endpoint = MetricsEndpoint::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  const int port = (*endpoint)->port();
  ASSERT_GT(port, 0);
  SCOPED_TRACE(absl::StrCat("port ", port));

  absl::StatusOr<std::string> text = HttpGet("127.0.0.1", port, "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  // prometheus-cpp prints labels sorted by name.
  EXPECT_NE(text->find("# TYPE retrace_requests_total counter\n"),
            std::string::npos)
      << *text;
  EXPECT_NE(
      text->find(
          "\nretrace_requests_total{code=\"OK\",method=\"Attribute\"} 2\n"),
      std::string::npos)
      << *text;
  EXPECT_NE(text->find("\nretrace_requests_total{code=\"INVALID_ARGUMENT\","
                       "method=\"Attribute\"} 1\n"),
            std::string::npos)
      << *text;
  EXPECT_NE(
      text->find("\nretrace_stage_duration_seconds_count{stage=\"score\"} 1\n"),
      std::string::npos)
      << *text;
  // 0.003 s lies in (0.0032 / 2, 0.0032].
  EXPECT_NE(
      text->find("\nretrace_stage_duration_seconds_bucket{stage=\"score\","
                 "le=\"0.0016\"} 0\n"),
      std::string::npos)
      << *text;
  EXPECT_NE(
      text->find("\nretrace_stage_duration_seconds_bucket{stage=\"score\","
                 "le=\"0.0032\"} 1\n"),
      std::string::npos)
      << *text;
  EXPECT_NE(text->find("\nretrace_store_samples 60000\n"), std::string::npos)
      << *text;
  EXPECT_NE(text->find("\nretrace_ready 1\n"), std::string::npos) << *text;

  // Scrapes see later changes.
  metrics.CountRequest("Attribute", "OK");
  text = HttpGet("127.0.0.1", port, "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_NE(
      text->find(
          "\nretrace_requests_total{code=\"OK\",method=\"Attribute\"} 3\n"),
      std::string::npos)
      << *text;
}

TEST(MetricsEndpointTest, KeepsTheRegistryAlive) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto metrics = std::make_unique<Metrics>(*registry);
  metrics->SetQueueDepth(5);
  auto endpoint = MetricsEndpoint::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  metrics.reset();
  registry.reset();
  absl::StatusOr<std::string> text =
      HttpGet("127.0.0.1", (*endpoint)->port(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_NE(text->find("\nretrace_queue_depth_queries 5\n"), std::string::npos)
      << *text;
}

TEST(MetricsEndpointTest, UnknownPathIsNotServed) {
  auto registry = std::make_shared<prometheus::Registry>();
  Metrics metrics(*registry);
  auto endpoint = MetricsEndpoint::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  EXPECT_FALSE(HttpGet("127.0.0.1", (*endpoint)->port(), "/nothing").ok());
}

TEST(MetricsEndpointTest, PortInUseIsUnavailableAndNamesTheAddress) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto first = MetricsEndpoint::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string address = absl::StrCat("127.0.0.1:", (*first)->port());
  auto second = MetricsEndpoint::Start(address, registry);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(address), std::string::npos)
      << second.status();
}

// civetweb alone takes up to 2 s to stop (its listener polls in 2 s slices);
// the endpoint wakes it, also when bound to every interface.
TEST(MetricsEndpointTest, StopsPromptly) {
  for (const std::string address : {"127.0.0.1:0", "0.0.0.0:0", "0"}) {
    SCOPED_TRACE(address);
    auto registry = std::make_shared<prometheus::Registry>();
    Metrics metrics(*registry);
    auto endpoint = MetricsEndpoint::Start(address, registry);
    ASSERT_TRUE(endpoint.ok()) << endpoint.status();
    const int port = (*endpoint)->port();
    ASSERT_TRUE(HttpGet("127.0.0.1", port, "/metrics").ok());
    const absl::Time start = absl::Now();
    endpoint->reset();
    EXPECT_LT(absl::Now() - start, absl::Seconds(1));
    EXPECT_FALSE(HttpGet("127.0.0.1", port, "/metrics").ok());
  }
}

TEST(MetricsEndpointTest, RejectsEmptyAddressAndNullRegistry) {
  auto registry = std::make_shared<prometheus::Registry>();
  EXPECT_EQ(MetricsEndpoint::Start("", registry).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MetricsEndpoint::Start("127.0.0.1:0", nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::metrics

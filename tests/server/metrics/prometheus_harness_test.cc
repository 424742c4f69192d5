// The harness's own pieces that need no Prometheus server.
#include "tests/server/metrics/prometheus_harness.h"

#include <gtest/gtest.h>

namespace retrace::testing {
namespace {

TEST(PrometheusHarnessTest, UrlEncodeKeepsOnlyUnreservedCharacters) {
  EXPECT_EQ(UrlEncode("retrace_requests_total"), "retrace_requests_total");
  EXPECT_EQ(UrlEncode("a{b=\"c d\"}~.-"), "a%7Bb%3D%22c%20d%22%7D~.-");
  EXPECT_EQ(UrlEncode("sum(x)/2"), "sum%28x%29%2F2");
}

TEST(PrometheusHarnessTest, HttpGetToAClosedPortIsUnavailable) {
  // Picked free and not listened on, so the connection is refused.
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  ASSERT_GT(*port, 0);
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", *port, "/metrics");
  ASSERT_FALSE(body.ok());
  EXPECT_EQ(body.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(body.status().message().find("/metrics"), std::string::npos)
      << body.status();
}

}  // namespace
}  // namespace retrace::testing

// Metrics against a registry's own Collect(): names, types, label values,
// and counts and sums recomputed here from the values put in.
#include "server/metrics/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "prometheus/metric_family.h"
#include "prometheus/registry.h"

namespace retrace::metrics {
namespace {

using LabelMap = std::map<std::string, std::string>;

// A relative tolerance for bucket bounds computed by repeated doubling.
constexpr double kBoundRelErr = 1e-12;

const prometheus::MetricFamily* FindFamily(
    const std::vector<prometheus::MetricFamily>& families,
    const std::string& name) {
  for (const auto& family : families) {
    if (family.name == name) return &family;
  }
  return nullptr;
}

LabelMap Labels(const prometheus::ClientMetric& metric) {
  LabelMap labels;
  for (const auto& label : metric.label) labels[label.name] = label.value;
  return labels;
}

const prometheus::ClientMetric* FindMetric(
    const prometheus::MetricFamily& family, const LabelMap& labels) {
  for (const auto& metric : family.metric) {
    if (Labels(metric) == labels) return &metric;
  }
  return nullptr;
}

// The single series of `name` with `labels`; fails the test when absent.
prometheus::ClientMetric Series(prometheus::Registry& registry,
                                const std::string& name,
                                const LabelMap& labels = {}) {
  const auto families = registry.Collect();
  const prometheus::MetricFamily* family = FindFamily(families, name);
  EXPECT_NE(family, nullptr) << name;
  if (family == nullptr) return {};
  const prometheus::ClientMetric* metric = FindMetric(*family, labels);
  EXPECT_NE(metric, nullptr) << name << " has no series with those labels";
  return metric == nullptr ? prometheus::ClientMetric{} : *metric;
}

// 100 µs doubling, written out independently of LatencyBucketsSeconds.
std::vector<double> ExpectedLatencyBounds() {
  std::vector<double> bounds;
  for (int k = 0; k < 20; ++k) bounds.push_back(1e-4 * std::pow(2.0, k));
  return bounds;
}

// Checks a collected histogram against `values` observed into buckets with
// upper bounds `bounds` (then +Inf): count, sum and every cumulative count.
void ExpectHistogram(const prometheus::ClientMetric& metric,
                     const std::vector<double>& bounds,
                     const std::vector<double>& values) {
  const auto& histogram = metric.histogram;
  EXPECT_EQ(histogram.sample_count, values.size());
  double sum = 0;
  for (double v : values) sum += v;
  EXPECT_NEAR(histogram.sample_sum, sum, 1e-12 * std::max(1.0, sum));
  ASSERT_EQ(histogram.bucket.size(), bounds.size() + 1);
  for (size_t b = 0; b < bounds.size(); ++b) {
    SCOPED_TRACE(::testing::Message() << "bucket le=" << bounds[b]);
    EXPECT_NEAR(histogram.bucket[b].upper_bound, bounds[b],
                kBoundRelErr * bounds[b]);
    uint64_t at_most = 0;
    for (double v : values) at_most += v <= bounds[b] ? 1 : 0;
    EXPECT_EQ(histogram.bucket[b].cumulative_count, at_most);
  }
  EXPECT_TRUE(std::isinf(histogram.bucket.back().upper_bound));
  EXPECT_EQ(histogram.bucket.back().cumulative_count, values.size());
}

TEST(MetricsTest, StageNames) {
  EXPECT_EQ(StageName(Stage::kDecode), "decode");
  EXPECT_EQ(StageName(Stage::kFeaturize), "featurize");
  EXPECT_EQ(StageName(Stage::kProject), "project");
  EXPECT_EQ(StageName(Stage::kQueue), "queue");
  EXPECT_EQ(StageName(Stage::kScore), "score");
  EXPECT_EQ(StageName(Stage::kSelect), "select");
}

TEST(MetricsTest, RegistersEveryFamilyAtConstruction) {
  prometheus::Registry registry;
  Metrics metrics(registry);
  const std::map<std::string, prometheus::MetricType> expected = {
      {"retrace_requests_total", prometheus::MetricType::Counter},
      {"retrace_request_duration_seconds", prometheus::MetricType::Histogram},
      {"retrace_stage_duration_seconds", prometheus::MetricType::Histogram},
      {"retrace_batch_size_queries", prometheus::MetricType::Histogram},
      {"retrace_queue_depth_queries", prometheus::MetricType::Gauge},
      {"retrace_requests_in_flight", prometheus::MetricType::Gauge},
      {"retrace_store_samples", prometheus::MetricType::Gauge},
      {"retrace_store_bytes", prometheus::MetricType::Gauge},
      {"retrace_device_memory_bytes", prometheus::MetricType::Gauge},
      {"retrace_ready", prometheus::MetricType::Gauge},
  };
  auto collected_types = [&registry] {
    std::map<std::string, prometheus::MetricType> types;
    for (const auto& family : registry.Collect()) {
      types[family.name] = family.type;
      EXPECT_FALSE(family.help.empty()) << family.name;
    }
    return types;
  };
  // prometheus-cpp collects no family without series: the per-method and
  // per-code ones show from their first use. The stages exist from the
  // start, at zero, with the latency buckets.
  auto without_first_use = expected;
  without_first_use.erase("retrace_requests_total");
  without_first_use.erase("retrace_request_duration_seconds");
  EXPECT_EQ(collected_types(), without_first_use);
  metrics.CountRequest("Attribute", "OK");
  metrics.ObserveRequest("Attribute", 0.01);
  EXPECT_EQ(collected_types(), expected);

  const auto families = registry.Collect();
  const auto* stages = FindFamily(families, "retrace_stage_duration_seconds");
  std::set<std::string> stage_labels;
  for (const auto& metric : stages->metric) {
    stage_labels.insert(Labels(metric).at("stage"));
    ExpectHistogram(metric, ExpectedLatencyBounds(), {});
  }
  EXPECT_EQ(stage_labels,
            (std::set<std::string>{"decode", "featurize", "project", "queue",
                                   "score", "select"}));
  EXPECT_EQ(Series(registry, "retrace_ready").gauge.value, 0);
}

TEST(MetricsTest, CountsRequestsByMethodAndCode) {
  prometheus::Registry registry;
  Metrics metrics(registry);
  for (int i = 0; i < 3; ++i) metrics.CountRequest("Attribute", "OK");
  metrics.CountRequest("Attribute", "INVALID_ARGUMENT");
  metrics.CountRequest("GetStoreInfo", absl::StatusCode::kUnavailable);
  metrics.CountRequest("GetStoreInfo", absl::StatusCode::kOk);

  EXPECT_EQ(Series(registry, "retrace_requests_total",
                   {{"method", "Attribute"}, {"code", "OK"}})
                .counter.value,
            3);
  EXPECT_EQ(Series(registry, "retrace_requests_total",
                   {{"method", "Attribute"}, {"code", "INVALID_ARGUMENT"}})
                .counter.value,
            1);
  EXPECT_EQ(Series(registry, "retrace_requests_total",
                   {{"method", "GetStoreInfo"}, {"code", "UNAVAILABLE"}})
                .counter.value,
            1);
  EXPECT_EQ(Series(registry, "retrace_requests_total",
                   {{"method", "GetStoreInfo"}, {"code", "OK"}})
                .counter.value,
            1);
  const auto families = registry.Collect();
  EXPECT_EQ(FindFamily(families, "retrace_requests_total")->metric.size(), 4u);
}

TEST(MetricsTest, LatencyHistograms) {
  prometheus::Registry registry;
  Metrics metrics(registry);
  // Values on both sides of bucket bounds, below the first and above the
  // last.
  const std::vector<double> attribute = {0.00005, 0.0001, 0.00015, 0.0032,
                                         0.25,    2.0,    75.0};
  const std::vector<double> store_info = {0.0004};
  for (double v : attribute) metrics.ObserveRequest("Attribute", v);
  for (double v : store_info) metrics.ObserveRequest("GetStoreInfo", v);
  const std::vector<double> score = {0.001, 0.002, 0.0025, 1.5};
  for (double v : score) metrics.ObserveStage(Stage::kScore, v);
  metrics.ObserveStage(Stage::kDecode, 0.0007);

  ExpectHistogram(Series(registry, "retrace_request_duration_seconds",
                         {{"method", "Attribute"}}),
                  ExpectedLatencyBounds(), attribute);
  ExpectHistogram(Series(registry, "retrace_request_duration_seconds",
                         {{"method", "GetStoreInfo"}}),
                  ExpectedLatencyBounds(), store_info);
  ExpectHistogram(
      Series(registry, "retrace_stage_duration_seconds", {{"stage", "score"}}),
      ExpectedLatencyBounds(), score);
  ExpectHistogram(
      Series(registry, "retrace_stage_duration_seconds", {{"stage", "decode"}}),
      ExpectedLatencyBounds(), {0.0007});
  ExpectHistogram(
      Series(registry, "retrace_stage_duration_seconds", {{"stage", "queue"}}),
      ExpectedLatencyBounds(), {});
}

TEST(MetricsTest, BatchSizeHistogram) {
  prometheus::Registry registry;
  Metrics metrics(registry);
  const std::vector<int64_t> sizes = {1, 1, 3, 8, 9, 64, 100};
  std::vector<double> values;
  for (int64_t size : sizes) {
    metrics.ObserveBatchSize(size);
    values.push_back(static_cast<double>(size));
  }
  ExpectHistogram(Series(registry, "retrace_batch_size_queries"),
                  {1, 2, 4, 8, 16, 32, 64}, values);
}

TEST(MetricsTest, Gauges) {
  prometheus::Registry registry;
  Metrics metrics(registry);
  metrics.SetQueueDepth(7);
  metrics.AddInFlight(1);
  metrics.AddInFlight(1);
  metrics.AddInFlight(-1);
  // Above 2^32, below 2^53: exact in a double.
  const int64_t bytes = int64_t{123456789012};
  metrics.SetStore(60000, bytes);
  metrics.SetDeviceMemory(int64_t{3} << 30);
  metrics.SetReady(true);

  EXPECT_EQ(Series(registry, "retrace_queue_depth_queries").gauge.value, 7);
  EXPECT_EQ(Series(registry, "retrace_requests_in_flight").gauge.value, 1);
  EXPECT_EQ(Series(registry, "retrace_store_samples").gauge.value, 60000);
  EXPECT_EQ(Series(registry, "retrace_store_bytes").gauge.value,
            123456789012.0);
  EXPECT_EQ(Series(registry, "retrace_device_memory_bytes").gauge.value,
            3.0 * 1024 * 1024 * 1024);
  EXPECT_EQ(Series(registry, "retrace_ready").gauge.value, 1);

  metrics.SetQueueDepth(0);
  metrics.AddInFlight(-1);
  metrics.SetDeviceMemory(0);
  metrics.SetReady(false);
  EXPECT_EQ(Series(registry, "retrace_queue_depth_queries").gauge.value, 0);
  EXPECT_EQ(Series(registry, "retrace_requests_in_flight").gauge.value, 0);
  EXPECT_EQ(Series(registry, "retrace_device_memory_bytes").gauge.value, 0);
  EXPECT_EQ(Series(registry, "retrace_ready").gauge.value, 0);
}

TEST(MetricsTest, TwoMetricsOnOneRegistryShareSeries) {
  prometheus::Registry registry;
  Metrics first(registry);
  Metrics second(registry);
  first.CountRequest("Attribute", "OK");
  second.CountRequest("Attribute", "OK");
  first.ObserveStage(Stage::kSelect, 0.5);
  second.ObserveStage(Stage::kSelect, 0.25);
  EXPECT_EQ(Series(registry, "retrace_requests_total",
                   {{"method", "Attribute"}, {"code", "OK"}})
                .counter.value,
            2);
  ExpectHistogram(
      Series(registry, "retrace_stage_duration_seconds", {{"stage", "select"}}),
      ExpectedLatencyBounds(), {0.5, 0.25});
}

// Many threads creating the same children for the first time at once: no
// count may be lost and no series duplicated.
TEST(MetricsTest, ConcurrentFirstUse) {
  constexpr int kThreads = 8;
  constexpr int kCallsPerThread = 2000;
  const std::vector<std::string> methods = {"Attribute", "AttributeStream",
                                            "SelfInfluence", "GetStoreInfo"};
  const std::vector<std::string> codes = {"OK", "INVALID_ARGUMENT",
                                          "RESOURCE_EXHAUSTED"};
  prometheus::Registry registry;
  Metrics metrics(registry);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kCallsPerThread; ++i) {
        metrics.CountRequest(methods[i % methods.size()],
                             codes[i % codes.size()]);
        metrics.ObserveRequest(methods[i % methods.size()], 0.001);
        metrics.AddInFlight(i % 2 == 0 ? 1 : -1);
      }
    });
  }
  for (auto& thread : threads) thread.join();

  std::map<std::pair<std::string, std::string>, int> expected_counts;
  std::map<std::string, int> expected_observations;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kCallsPerThread; ++i) {
      ++expected_counts[{methods[i % methods.size()], codes[i % codes.size()]}];
      ++expected_observations[methods[i % methods.size()]];
    }
  }
  const auto families = registry.Collect();
  EXPECT_EQ(FindFamily(families, "retrace_requests_total")->metric.size(),
            expected_counts.size());
  for (const auto& [key, count] : expected_counts) {
    SCOPED_TRACE(key.first + " " + key.second);
    EXPECT_EQ(Series(registry, "retrace_requests_total",
                     {{"method", key.first}, {"code", key.second}})
                  .counter.value,
              count);
  }
  for (const auto& [method, count] : expected_observations) {
    SCOPED_TRACE(method);
    EXPECT_EQ(Series(registry, "retrace_request_duration_seconds",
                     {{"method", method}})
                  .histogram.sample_count,
              static_cast<uint64_t>(count));
  }
  EXPECT_EQ(Series(registry, "retrace_requests_in_flight").gauge.value, 0);
}

}  // namespace
}  // namespace retrace::metrics

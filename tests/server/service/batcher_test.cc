// The dynamic batcher with a scoring function that records its batches:
// batch sizes and delays, results routed to the right caller, a bad query
// isolated, a full queue, a deadline passing in the queue and shutdown.
#include "server/service/batcher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"

namespace retrace::service {
namespace {

// Each query's "result" encodes its k as a score, so answers can be traced
// back to their caller; k < 0 marks a query the scorer refuses.
class RecordingScorer {
 public:
  absl::StatusOr<std::vector<scoring::QueryResult>> operator()(
      const std::vector<scoring::ScoreQuery>& batch) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_.push_back(static_cast<int>(batch.size()));
    }
    if (delay_ > absl::ZeroDuration()) absl::SleepFor(delay_);
    std::vector<scoring::QueryResult> results;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].k < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("query ", i, ": k is negative"));
      }
      scoring::QueryResult r;
      r.tracin.proponents.push_back(
          {.index = batch[i].k, .score = static_cast<float>(batch[i].k)});
      results.push_back(r);
    }
    return results;
  }
  std::vector<int> sizes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return sizes_;
  }
  absl::Duration delay_ = absl::ZeroDuration();

 private:
  std::mutex mutex_;
  std::vector<int> sizes_;
};

scoring::ScoreQuery Query(int k) {
  scoring::ScoreQuery q;
  q.k = k;
  return q;
}

TEST(BatcherTest, ConcurrentQueriesShareBatchesAndGetTheirOwnResults) {
  RecordingScorer scorer;
  scorer.delay_ = absl::Milliseconds(20);
  BatcherOptions options;
  options.max_batch = 8;
  options.max_queue_delay_us = 20000;
  Batcher batcher(std::ref(scorer), options, nullptr);
  constexpr int kQueries = 40;
  std::vector<int> got(kQueries, -1);
  std::vector<std::thread> threads;
  for (int i = 0; i < kQueries; ++i) {
    threads.emplace_back([&, i] {
      auto r = batcher.Score(Query(i), absl::InfiniteFuture());
      ASSERT_TRUE(r.ok()) << r.status();
      got[i] = static_cast<int>(r->result.tracin.proponents[0].index);
      EXPECT_GE(r->batch_size, 1);
      EXPECT_LE(r->batch_size, 8);
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kQueries; ++i) EXPECT_EQ(got[i], i);
  int total = 0, largest = 0;
  for (int s : scorer.sizes()) {
    EXPECT_LE(s, 8);
    total += s;
    largest = std::max(largest, s);
  }
  EXPECT_EQ(total, kQueries);
  EXPECT_GT(largest, 1) << "no two queries were ever batched together";
}

TEST(BatcherTest, ALoneQueryWaitsAtMostTheDelay) {
  RecordingScorer scorer;
  BatcherOptions options;
  options.max_batch = 64;
  options.max_queue_delay_us = 30000;
  Batcher batcher(std::ref(scorer), options, nullptr);
  const absl::Time start = absl::Now();
  auto r = batcher.Score(Query(1), absl::InfiniteFuture());
  ASSERT_TRUE(r.ok());
  const absl::Duration took = absl::Now() - start;
  EXPECT_GE(took, absl::Milliseconds(29));
  EXPECT_LT(took, absl::Seconds(5));
  EXPECT_GE(r->queue_seconds, 0.029);
}

TEST(BatcherTest, ABadQueryDoesNotFailItsBatch) {
  RecordingScorer scorer;
  scorer.delay_ = absl::Milliseconds(5);
  BatcherOptions options;
  options.max_batch = 4;
  options.max_queue_delay_us = 50000;
  Batcher batcher(std::ref(scorer), options, nullptr);
  std::vector<absl::StatusOr<BatchedResult>> results(4, absl::UnknownError(""));
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      results[i] =
          batcher.Score(Query(i == 2 ? -1 : i), absl::InfiniteFuture());
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    if (i == 2) {
      EXPECT_EQ(results[i].status().code(), absl::StatusCode::kInvalidArgument);
    } else {
      ASSERT_TRUE(results[i].ok()) << results[i].status();
      EXPECT_EQ(results[i]->result.tracin.proponents[0].index, i);
    }
  }
}

TEST(BatcherTest, AFullQueueRefusesAndShutdownAnswersTheQueued) {
  RecordingScorer scorer;
  scorer.delay_ = absl::Milliseconds(500);
  BatcherOptions options;
  options.max_batch = 1;
  options.max_queue_delay_us = 0;
  options.max_queue = 2;
  auto batcher = std::make_unique<Batcher>(std::ref(scorer), options, nullptr);
  // One query is being scored (500 ms); two more fill the queue.
  std::vector<std::thread> threads;
  std::atomic<int> unavailable{0}, ok{0};
  threads.emplace_back(
      [&] { ok += batcher->Score(Query(0), absl::InfiniteFuture()).ok(); });
  // Polls instead of sleeping a fixed time, so a loaded machine cannot
  // reorder the steps.
  auto wait_for = [](const std::function<bool()>& done) {
    const absl::Time until = absl::Now() + absl::Seconds(30);
    while (!done() && absl::Now() < until)
      absl::SleepFor(absl::Milliseconds(1));
    return done();
  };
  ASSERT_TRUE(wait_for([&] { return !scorer.sizes().empty(); }));
  for (int i = 1; i <= 2; ++i) {
    threads.emplace_back([&, i] {
      auto r = batcher->Score(Query(i), absl::InfiniteFuture());
      if (r.ok()) ++ok;
      if (r.status().code() == absl::StatusCode::kUnavailable) ++unavailable;
    });
  }
  ASSERT_TRUE(wait_for([&] { return batcher->queue_depth() == 2; }));
  auto full = batcher->Score(Query(3), absl::InfiniteFuture());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(full.status().message(), "queue is full"));
  batcher.reset();  // waits for the scan in progress; queued ones: Unavailable
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load() + unavailable.load(), 3);
  EXPECT_GE(ok.load(), 1);
}

TEST(BatcherTest, ADeadlineThatPassesInTheQueueEndsTheWait) {
  RecordingScorer scorer;
  scorer.delay_ = absl::Milliseconds(400);
  BatcherOptions options;
  options.max_batch = 1;
  options.max_queue_delay_us = 0;
  Batcher batcher(std::ref(scorer), options, nullptr);
  std::thread first([&] {
    EXPECT_TRUE(batcher.Score(Query(0), absl::InfiniteFuture()).ok());
  });
  while (scorer.sizes().empty()) absl::SleepFor(absl::Milliseconds(1));
  // The scan of the first query takes 400 ms; this one may wait 20.
  const absl::Time start = absl::Now();
  auto late = batcher.Score(Query(1), start + absl::Milliseconds(20));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded)
      << late.status();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(300));
  first.join();
}

TEST(BatcherTest, OptionsAreChecked) {
  BatcherOptions o;
  o.max_batch = 65;
  EXPECT_EQ(Batcher::CheckOptions(o).code(),
            absl::StatusCode::kInvalidArgument);
  o.max_batch = 8;
  o.max_queue = 0;
  EXPECT_EQ(Batcher::CheckOptions(o).code(),
            absl::StatusCode::kInvalidArgument);
  o.max_queue = 1;
  EXPECT_TRUE(Batcher::CheckOptions(o).ok());
}

}  // namespace
}  // namespace retrace::service

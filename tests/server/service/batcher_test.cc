// The dynamic batcher on simulated time, with a scoring function that
// records its batches: when a batch closes (full at once, or exactly when its
// oldest query's delay runs out, not a nanosecond before), results routed to
// the right caller, a bad query isolated, a full queue, deadlines passing in
// the queue, an idle queue and shutdown. Nothing sleeps: the test waits for
// threads to block on the clock (SimulatedClock::AwaitWaiters), then moves
// time.
#include "server/service/batcher.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/clock.h"

namespace retrace::service {
namespace {

const absl::Time kStart = absl::FromUnixSeconds(1000);
// A deadline no test reaches; finite, so that its caller waits on the clock
// and AwaitWaiters counts it.
const absl::Time kFar = absl::FromUnixSeconds(1000 + 3600);

// Each query's "result" encodes its k as an index, so answers can be traced
// back to their caller; k < 0 marks a query the scorer refuses. With Hold(),
// scans block until Release().
class RecordingScorer {
 public:
  absl::StatusOr<std::vector<scoring::QueryResult>> operator()(
      const std::vector<scoring::ScoreQuery>& batch) {
    std::unique_lock<std::mutex> lock(mutex_);
    std::vector<int> ks;
    for (const scoring::ScoreQuery& q : batch) ks.push_back(q.k);
    batches_.push_back(ks);
    changed_.notify_all();
    changed_.wait(lock, [&] { return !held_; });
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

  // The k of each query, per batch, in the order the batches were scanned.
  std::vector<std::vector<int>> batches() {
    std::lock_guard<std::mutex> lock(mutex_);
    return batches_;
  }
  std::vector<int> sizes() {
    std::vector<int> sizes;
    for (const auto& b : batches()) sizes.push_back(static_cast<int>(b.size()));
    return sizes;
  }
  void AwaitBatches(size_t n) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return batches_.size() >= n; });
  }
  void Hold() {
    std::lock_guard<std::mutex> lock(mutex_);
    held_ = true;
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mutex_);
    held_ = false;
    changed_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::vector<int>> batches_;
  bool held_ = false;
};

// Score calls, each on its own thread, and their answers.
class Calls {
 public:
  explicit Calls(Batcher* batcher) : batcher_(batcher) {}
  ~Calls() {
    for (std::thread& t : threads_) t.join();
  }

  // Starts Score(query with this k, deadline); its answer is result(k).
  void Start(int k, absl::Time deadline) {
    threads_.emplace_back([this, k, deadline] {
      scoring::ScoreQuery q;
      q.k = k;
      absl::StatusOr<BatchedResult> r = batcher_->Score(std::move(q), deadline);
      std::lock_guard<std::mutex> lock(mutex_);
      results_.emplace(k, std::move(r));
      changed_.notify_all();
    });
  }
  // Blocks until `n` calls have returned.
  void AwaitDone(size_t n) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return results_.size() >= n; });
  }
  size_t done() {
    std::lock_guard<std::mutex> lock(mutex_);
    return results_.size();
  }
  absl::StatusOr<BatchedResult> result(int k) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = results_.find(k);
    if (it == results_.end()) return absl::NotFoundError("not returned");
    return it->second;
  }

 private:
  Batcher* const batcher_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<int, absl::StatusOr<BatchedResult>> results_;
  std::vector<std::thread> threads_;
};

BatcherOptions Options(SimulatedClock* clock, int32_t max_batch,
                       absl::Duration delay) {
  BatcherOptions options;
  options.max_batch = max_batch;
  options.max_queue_delay_us = absl::ToInt64Microseconds(delay);
  options.clock = clock;
  return options;
}

// The answer of call k was scored in a batch of `batch_size` after
// `queued` in the queue.
void ExpectScored(Calls& calls, int k, int batch_size, absl::Duration queued) {
  SCOPED_TRACE(::testing::Message() << "query " << k);
  absl::StatusOr<BatchedResult> r = calls.result(k);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->result.tracin.proponents.size(), 1u);
  EXPECT_EQ(r->result.tracin.proponents[0].index, k);
  EXPECT_EQ(r->batch_size, batch_size);
  EXPECT_EQ(r->queue_seconds, absl::ToDoubleSeconds(queued));
}

TEST(BatcherTest, ALoneQueryIsFlushedExactlyWhenTheDelayRunsOut) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(30);
  Batcher batcher(std::ref(scorer), Options(&clock, 64, delay), nullptr);
  Calls calls(&batcher);
  calls.Start(1, kFar);
  clock.AwaitWaiters(2);  // the caller, and the batcher until the delay
  clock.Advance(delay - absl::Nanoseconds(1));
  EXPECT_TRUE(scorer.batches().empty());
  EXPECT_EQ(batcher.queue_depth(), 1);
  EXPECT_EQ(calls.done(), 0u);
  clock.Advance(absl::Nanoseconds(1));
  calls.AwaitDone(1);
  EXPECT_EQ(scorer.sizes(), std::vector<int>{1});
  ExpectScored(calls, 1, 1, delay);
}

TEST(BatcherTest, ABatchClosesAtItsOldestQuerysDelay) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(10);
  Batcher batcher(std::ref(scorer), Options(&clock, 64, delay), nullptr);
  Calls calls(&batcher);
  calls.Start(1, kFar);
  clock.AwaitWaiters(2);
  clock.Advance(delay / 2);
  calls.Start(2, kFar);
  clock.AwaitWaiters(3);  // both callers and the batcher
  EXPECT_TRUE(scorer.batches().empty());
  clock.Advance(delay / 2);
  calls.AwaitDone(2);
  EXPECT_EQ(scorer.sizes(), std::vector<int>{2});
  ExpectScored(calls, 1, 2, delay);
  ExpectScored(calls, 2, 2, delay / 2);
}

TEST(BatcherTest, ExactlyMaxBatchQueriesAreFlushedWithoutWaiting) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  Batcher batcher(std::ref(scorer), Options(&clock, 4, absl::Hours(2)),
                  nullptr);
  Calls calls(&batcher);
  for (int k = 0; k < 4; ++k) calls.Start(k, kFar);
  calls.AwaitDone(4);  // time never moved
  EXPECT_EQ(scorer.sizes(), std::vector<int>{4});
  for (int k = 0; k < 4; ++k) ExpectScored(calls, k, 4, absl::ZeroDuration());
  EXPECT_EQ(clock.Now(), kStart);
}

TEST(BatcherTest, OneMoreThanMaxBatchLeavesOneQueryPending) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(10);
  Batcher batcher(std::ref(scorer), Options(&clock, 4, delay), nullptr);
  Calls calls(&batcher);
  for (int k = 0; k < 5; ++k) calls.Start(k, kFar);
  calls.AwaitDone(4);
  // Only the fifth caller and the batcher, waiting for its delay, are left.
  clock.AwaitWaiters(2);
  EXPECT_EQ(scorer.sizes(), std::vector<int>{4});
  EXPECT_EQ(batcher.queue_depth(), 1);
  int pending = -1;
  for (int k = 0; k < 5; ++k) {
    if (!calls.result(k).ok()) pending = k;
  }
  ASSERT_NE(pending, -1);
  for (int k = 0; k < 5; ++k) {
    if (k != pending) ExpectScored(calls, k, 4, absl::ZeroDuration());
  }
  clock.Advance(delay);
  calls.AwaitDone(5);
  EXPECT_EQ(scorer.sizes(), (std::vector<int>{4, 1}));
  ExpectScored(calls, pending, 1, delay);
}

TEST(BatcherTest, ManyQueriesShareFullBatchesAndGetTheirOwnResults) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  Batcher batcher(std::ref(scorer), Options(&clock, 8, absl::Hours(2)),
                  nullptr);
  Calls calls(&batcher);
  constexpr int kQueries = 40;
  for (int k = 0; k < kQueries; ++k) calls.Start(k, kFar);
  calls.AwaitDone(kQueries);
  EXPECT_EQ(scorer.sizes(), std::vector<int>(kQueries / 8, 8));
  for (int k = 0; k < kQueries; ++k) {
    ExpectScored(calls, k, 8, absl::ZeroDuration());
  }
}

TEST(BatcherTest, ADeadlineThatPassesInTheQueueNeverReachesTheScan) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(10);
  Batcher batcher(std::ref(scorer), Options(&clock, 64, delay), nullptr);
  Calls calls(&batcher);
  calls.Start(1, kStart + delay / 2);
  calls.Start(2, kFar);
  clock.AwaitWaiters(3);  // both callers and the batcher
  clock.Advance(delay / 2);
  calls.AwaitDone(1);
  EXPECT_EQ(calls.result(1).status().code(),
            absl::StatusCode::kDeadlineExceeded)
      << calls.result(1).status();
  EXPECT_TRUE(scorer.batches().empty());
  // The batch closes at the first query's delay, without it.
  clock.Advance(delay / 2);
  calls.AwaitDone(2);
  EXPECT_EQ(scorer.batches(), std::vector<std::vector<int>>{{2}});
  ExpectScored(calls, 2, 1, delay);
}

TEST(BatcherTest, ADeadlineAtTheFlushEndsTheQueryNotTheBatch) {
  // The query's deadline is the moment its batch closes: it is not scored,
  // while the one behind it, in the same batch, is.
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(10);
  Batcher batcher(std::ref(scorer), Options(&clock, 64, delay), nullptr);
  Calls calls(&batcher);
  calls.Start(1, kStart + delay);
  calls.Start(2, kFar);
  clock.AwaitWaiters(3);
  clock.Advance(delay);
  calls.AwaitDone(2);
  EXPECT_EQ(calls.result(1).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(scorer.batches(), std::vector<std::vector<int>>{{2}});
}

TEST(BatcherTest, AnEmptyQueueIgnoresTime) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  const absl::Duration delay = absl::Milliseconds(10);
  Batcher batcher(std::ref(scorer), Options(&clock, 64, delay), nullptr);
  for (int i = 0; i < 5; ++i) clock.Advance(absl::Hours(1));
  // The idle batcher waits for a query, not for a time.
  EXPECT_EQ(clock.num_waiters(), 0);
  EXPECT_TRUE(scorer.batches().empty());
  EXPECT_EQ(batcher.queue_depth(), 0);
  // The delay counts from the query's arrival, not from the batcher's start.
  Calls calls(&batcher);
  calls.Start(1, absl::InfiniteFuture());
  clock.AwaitWaiters(1);  // the batcher (an endless wait is not counted)
  clock.Advance(delay - absl::Nanoseconds(1));
  EXPECT_TRUE(scorer.batches().empty());
  clock.Advance(absl::Nanoseconds(1));
  calls.AwaitDone(1);
  ExpectScored(calls, 1, 1, delay);
}

TEST(BatcherTest, ABadQueryDoesNotFailItsBatch) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  Batcher batcher(std::ref(scorer), Options(&clock, 4, absl::Hours(2)),
                  nullptr);
  Calls calls(&batcher);
  for (int k : {0, 1, -1, 3}) calls.Start(k, kFar);
  calls.AwaitDone(4);
  EXPECT_EQ(calls.result(-1).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The batch of 4 failed; each query was then scored on its own.
  const std::vector<int> sizes = scorer.sizes();
  ASSERT_EQ(sizes.size(), 5u);
  EXPECT_EQ(sizes[0], 4);
  for (int k : {0, 1, 3}) ExpectScored(calls, k, 1, absl::ZeroDuration());
}

TEST(BatcherTest, AFullQueueRefusesAndShutdownAnswersTheQueued) {
  SimulatedClock clock(kStart);
  RecordingScorer scorer;
  scorer.Hold();
  BatcherOptions options = Options(&clock, 1, absl::ZeroDuration());
  options.max_queue = 2;
  auto batcher = std::make_unique<Batcher>(std::ref(scorer), options, nullptr);
  Calls calls(batcher.get());
  // Query 0 is being scanned (held); 1 and 2 fill the queue.
  calls.Start(0, kFar);
  scorer.AwaitBatches(1);
  calls.Start(1, kFar);
  calls.Start(2, kFar);
  clock.AwaitWaiters(3);  // the three callers; the batcher is scanning
  EXPECT_EQ(batcher->queue_depth(), 2);
  absl::StatusOr<BatchedResult> full = batcher->Score({}, kFar);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(full.status().message(), "queue is full"))
      << full.status();
  // Shutdown answers the queued at once and waits for the scan in progress.
  std::thread shutdown([&] { batcher.reset(); });
  calls.AwaitDone(2);
  for (int k : {1, 2}) {
    EXPECT_EQ(calls.result(k).status().code(), absl::StatusCode::kUnavailable)
        << k;
  }
  EXPECT_EQ(calls.done(), 2u);
  scorer.Release();
  shutdown.join();
  calls.AwaitDone(3);
  ExpectScored(calls, 0, 1, absl::ZeroDuration());
  EXPECT_EQ(scorer.sizes(), std::vector<int>{1});
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
  o.clock = nullptr;
  EXPECT_EQ(Batcher::CheckOptions(o).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::service

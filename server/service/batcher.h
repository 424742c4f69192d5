// Dynamic batching (docs/operations.md): queries from concurrent requests
// wait in one queue and are scored together, one scan of the store per batch.
//
//   Batcher batcher(
//       [&](const std::vector<scoring::ScoreQuery>& b) { return
//       scorer->Score(b); }, options, &metrics);
//   ASSIGN_OR_RETURN(BatchedResult r, batcher.Score(std::move(q), deadline));
//
// A batch is closed when it holds max_batch queries or when its oldest query
// has waited max_queue_delay; it is then handed to the scoring function on the
// batcher's own thread (scans run one at a time anyway: each uses the whole
// device or every core). Callers should validate queries first (the engine
// does): if a batch still fails with InvalidArgument, its queries are scored
// one by one so that one bad query cannot fail the others.
//
// Time (the queue delay, deadlines, the reported queue and score times) is
// the options' clock's, so tests drive the batcher on simulated time.
//
// Thread safety: Score may be called from any number of threads.
#ifndef RETRACE_SERVER_SERVICE_BATCHER_H_
#define RETRACE_SERVER_SERVICE_BATCHER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "server/metrics/metrics.h"
#include "server/scoring/scorer.h"

namespace retrace::service {

struct BatcherOptions {
  int32_t max_batch = 32;  // 1..64 (kernels::kMaxQueries)
  int64_t max_queue_delay_us = 2000;
  int32_t max_queue = 256;  // queued queries beyond which Score refuses
  // Must outlive the batcher.
  Clock* clock = Clock::Real();
};

// A query's result and where its time went.
struct BatchedResult {
  scoring::QueryResult result;
  double queue_seconds = 0;  // enqueued until its batch started
  double score_seconds = 0;  // the batch's scan (shared by the whole batch)
  int32_t batch_size = 0;
};

class Batcher {
 public:
  using ScoreFn =
      std::function<absl::StatusOr<std::vector<scoring::QueryResult>>(
          const std::vector<scoring::ScoreQuery>&)>;

  // `metrics` may be null; it must outlive the batcher. InvalidArgument
  // options are clamped by the caller (CheckOptions).
  Batcher(ScoreFn score, BatcherOptions options, metrics::Metrics* metrics);
  // Answers the queries still queued with Unavailable at once, then waits
  // for the batch being scored (its queries get their results) and stops the
  // thread.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  static absl::Status CheckOptions(const BatcherOptions& options);

  // Blocks until the query's batch has been scored.
  //   ResourceExhausted: max_queue queries are already waiting.
  //   DeadlineExceeded: `deadline` passed before the result was ready.
  //   Unavailable: the batcher is shutting down.
  //   Errors of the scoring function for this query.
  absl::StatusOr<BatchedResult> Score(scoring::ScoreQuery query,
                                      absl::Time deadline);

  int64_t queue_depth() const;

 private:
  struct Pending;
  void Run();
  void ScoreBatch(std::vector<std::shared_ptr<Pending>>& batch);

  const ScoreFn score_;
  const BatcherOptions options_;
  Clock* const clock_;
  metrics::Metrics* const metrics_;

  mutable std::mutex mutex_;
  std::condition_variable queue_changed_;
  std::deque<std::shared_ptr<Pending>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_BATCHER_H_

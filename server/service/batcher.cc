#include "server/service/batcher.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/scoring.h"

namespace retrace::service {

struct Batcher::Pending {
  scoring::ScoreQuery query;
  absl::Time deadline;
  absl::Time enqueued;
  std::mutex mutex;
  std::condition_variable done_changed;
  bool done = false;
  absl::StatusOr<BatchedResult> result = absl::UnknownError("not scored");

  void Finish(absl::StatusOr<BatchedResult> r) {
    std::lock_guard<std::mutex> lock(mutex);
    result = std::move(r);
    done = true;
    done_changed.notify_all();
  }
};

absl::Status Batcher::CheckOptions(const BatcherOptions& options) {
  if (options.max_batch < 1 || options.max_batch > kernels::kMaxQueries) {
    return absl::InvalidArgumentError(
        absl::StrCat("max batch must be in 1..", kernels::kMaxQueries, ", got ",
                     options.max_batch));
  }
  if (options.max_queue_delay_us < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max queue delay must be >= 0 µs, got ", options.max_queue_delay_us));
  }
  if (options.max_queue < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max queue must be >= 1, got ", options.max_queue));
  }
  if (options.clock == nullptr) {
    return absl::InvalidArgumentError("the batcher needs a clock");
  }
  return absl::OkStatus();
}

Batcher::Batcher(ScoreFn score, BatcherOptions options,
                 metrics::Metrics* metrics)
    : score_(std::move(score)),
      options_(options),
      clock_(options.clock),
      metrics_(metrics) {
  thread_ = std::thread([this] { Run(); });
}

Batcher::~Batcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    // Now rather than after the scan in progress: these will not be scored.
    for (const std::shared_ptr<Pending>& p : queue_) {
      p->Finish(absl::UnavailableError("the server is shutting down"));
    }
    queue_.clear();
    if (metrics_ != nullptr) metrics_->SetQueueDepth(0);
  }
  queue_changed_.notify_all();
  thread_.join();
}

int64_t Batcher::queue_depth() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(queue_.size());
}

absl::StatusOr<BatchedResult> Batcher::Score(scoring::ScoreQuery query,
                                             absl::Time deadline) {
  auto pending = std::make_shared<Pending>();
  pending->query = std::move(query);
  pending->deadline = deadline;
  pending->enqueued = clock_->Now();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
    if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the scoring queue is full (", options_.max_queue,
                       " queries waiting); retry later"));
    }
    queue_.push_back(pending);
    if (metrics_ != nullptr) {
      metrics_->SetQueueDepth(static_cast<int64_t>(queue_.size()));
    }
  }
  queue_changed_.notify_all();

  std::unique_lock<std::mutex> lock(pending->mutex);
  if (!clock_->WaitUntil(pending->done_changed, lock, deadline,
                         [&] { return pending->done; })) {
    // The batch thread still owns `pending` and finishes it later; nobody
    // waits for that result any more.
    return absl::DeadlineExceededError(
        "the deadline passed while the query waited to be scored");
  }
  return std::move(pending->result);
}

void Batcher::Run() {
  const absl::Duration max_delay =
      absl::Microseconds(options_.max_queue_delay_us);
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    queue_changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) break;
    // Wait for a full batch or for the oldest query's delay to run out.
    const absl::Time close_at = queue_.front()->enqueued + max_delay;
    clock_->WaitUntil(queue_changed_, lock, close_at, [&] {
      return stopping_ ||
             static_cast<int32_t>(queue_.size()) >= options_.max_batch;
    });
    if (stopping_) break;
    std::vector<std::shared_ptr<Pending>> batch;
    const absl::Time now = clock_->Now();
    while (!queue_.empty() &&
           static_cast<int32_t>(batch.size()) < options_.max_batch) {
      std::shared_ptr<Pending> p = std::move(queue_.front());
      queue_.pop_front();
      if (p->deadline <= now) {
        p->Finish(absl::DeadlineExceededError(
            "the deadline passed while the query waited in the queue"));
        continue;
      }
      batch.push_back(std::move(p));
    }
    if (metrics_ != nullptr) {
      metrics_->SetQueueDepth(static_cast<int64_t>(queue_.size()));
    }
    if (batch.empty()) continue;
    lock.unlock();
    ScoreBatch(batch);
    lock.lock();
  }
}

void Batcher::ScoreBatch(std::vector<std::shared_ptr<Pending>>& batch) {
  const absl::Time start = clock_->Now();
  std::vector<scoring::ScoreQuery> queries;
  queries.reserve(batch.size());
  for (const auto& p : batch) queries.push_back(p->query);
  if (metrics_ != nullptr) {
    metrics_->ObserveBatchSize(static_cast<int64_t>(batch.size()));
  }
  absl::StatusOr<std::vector<scoring::QueryResult>> results = score_(queries);
  const double seconds = absl::ToDoubleSeconds(clock_->Now() - start);
  if (results.ok() && results->size() != batch.size()) {
    results = absl::InternalError(absl::StrCat("the scorer returned ",
                                               results->size(), " results for ",
                                               batch.size(), " queries"));
  }
  if (!results.ok() && batch.size() > 1 &&
      results.status().code() == absl::StatusCode::kInvalidArgument) {
    // Isolate the bad query: score each one on its own.
    for (const auto& p : batch) {
      std::vector<std::shared_ptr<Pending>> one = {p};
      ScoreBatch(one);
    }
    return;
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!results.ok()) {
      batch[i]->Finish(results.status());
      continue;
    }
    BatchedResult r;
    r.result = std::move((*results)[i]);
    r.queue_seconds = absl::ToDoubleSeconds(start - batch[i]->enqueued);
    r.score_seconds = seconds;
    r.batch_size = static_cast<int32_t>(batch.size());
    batch[i]->Finish(std::move(r));
  }
}

}  // namespace retrace::service

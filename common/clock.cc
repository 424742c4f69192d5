#include "common/clock.h"

#include <cstdlib>
#include <vector>

#include "absl/time/clock.h"

namespace retrace {
namespace {

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }

 protected:
  bool WaitOnce(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                absl::Time deadline) override {
    if (deadline == absl::InfiniteFuture()) {
      cv.wait(lock);
      return true;
    }
    return cv.wait_until(lock, absl::ToChronoTime(deadline)) ==
           std::cv_status::no_timeout;
  }
};

}  // namespace

Clock* Clock::Real() {
  static RealClock* const clock = new RealClock;
  return clock;
}

SimulatedClock::SimulatedClock(absl::Time start) : now_(start) {}

SimulatedClock::~SimulatedClock() {
  // A waiter left behind would hold a pointer into a destroyed clock.
  std::lock_guard<std::mutex> lock(mutex_);
  if (!waiters_.empty()) std::abort();
}

absl::Time SimulatedClock::Now() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return now_;
}

int64_t SimulatedClock::num_waiters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(waiters_.size());
}

void SimulatedClock::AwaitWaiters(int64_t n) const {
  std::unique_lock<std::mutex> lock(mutex_);
  waiters_changed_.wait(
      lock, [&] { return static_cast<int64_t>(waiters_.size()) >= n; });
}

// The waiter registers while it still holds its own mutex, and Advance
// notifies while holding that mutex too: so a notification cannot fall
// between the waiter's look at the time and its wait on `cv`. Advance cannot
// take the waiter's mutex while holding the clock's (the waiter takes them in
// the other order), so it pins the waiters it will notify, and a waiter
// leaves only when no Advance holds a pin on it (its `cv` and mutex stay
// valid until then).
bool SimulatedClock::WaitOnce(std::condition_variable& cv,
                              std::unique_lock<std::mutex>& lock,
                              absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) {
    cv.wait(lock);
    return true;
  }
  std::list<Waiter>::iterator self;
  {
    std::lock_guard<std::mutex> clock_lock(mutex_);
    if (now_ >= deadline) return false;
    self = waiters_.insert(waiters_.end(), Waiter{&cv, lock.mutex(), deadline});
  }
  waiters_changed_.notify_all();
  cv.wait(lock);
  lock.unlock();
  bool due = false;
  {
    std::unique_lock<std::mutex> clock_lock(mutex_);
    waiters_changed_.wait(clock_lock, [&] { return self->pins == 0; });
    waiters_.erase(self);
    due = now_ >= deadline;
  }
  waiters_changed_.notify_all();
  lock.lock();
  return !due;
}

void SimulatedClock::Advance(absl::Duration d) {
  std::vector<Waiter*> due;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (d > absl::ZeroDuration()) now_ += d;
    for (Waiter& w : waiters_) {
      if (w.deadline <= now_) {
        ++w.pins;
        due.push_back(&w);
      }
    }
  }
  for (Waiter* w : due) {
    std::lock_guard<std::mutex> lock(*w->mutex);
    w->cv->notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Waiter* w : due) --w->pins;
  }
  waiters_changed_.notify_all();
}

}  // namespace retrace

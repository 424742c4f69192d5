// Time as the server sees it: the current time, and waiting on a condition
// variable until a time point. Everything that closes batches or checks
// deadlines takes a Clock, so that tests can run it on simulated time
// instead of sleeping.
//
//   Clock* clock = options.clock;  // Clock::Real() unless a test sets one
//   std::unique_lock<std::mutex> lock(mutex_);
//   clock->WaitUntil(changed_, lock, clock->Now() + delay,
//                    [&] { return queue_.size() >= max_batch; });
//
//   SimulatedClock clock;          // in a test
//   ...start threads that wait on `clock`...
//   clock.AwaitWaiters(2);         // both are blocked in WaitUntil
//   clock.Advance(absl::Milliseconds(5));  // wakes those now due
//
// Thread safety: every method of both clocks may be called from any thread.
#ifndef RETRACE_COMMON_CLOCK_H_
#define RETRACE_COMMON_CLOCK_H_

#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>

#include "absl/time/time.h"

namespace retrace {

class Clock {
 public:
  // The system clock (absl::Now, condition variables' own timed waits). Never
  // destroyed; stateless, so sharing it is harmless.
  static Clock* Real();

  virtual ~Clock() = default;

  virtual absl::Time Now() const = 0;

  // Waits on `cv` until `done()` holds or Now() reaches `deadline`, whichever
  // comes first, and returns done(). `lock` must hold the mutex that guards
  // what done() reads and that notifiers of `cv` lock; it is held again on
  // return. absl::InfiniteFuture() waits for done() alone.
  template <typename Predicate>
  bool WaitUntil(std::condition_variable& cv,
                 std::unique_lock<std::mutex>& lock, absl::Time deadline,
                 Predicate done) {
    while (!done()) {
      if (!WaitOnce(cv, lock, deadline)) return done();
    }
    return true;
  }

 protected:
  // One wait on `cv`: returns when it is notified (or wakes spuriously), true,
  // or once Now() >= deadline, false (at once if that is so already).
  virtual bool WaitOnce(std::condition_variable& cv,
                        std::unique_lock<std::mutex>& lock,
                        absl::Time deadline) = 0;
};

// A clock that moves only when told to. Threads waiting in WaitUntil with a
// deadline are woken by the Advance that reaches it, and by nothing else but
// their condition variable: time never passes on its own, so a test decides
// exactly which waits have run out.
class SimulatedClock final : public Clock {
 public:
  explicit SimulatedClock(absl::Time start = absl::UnixEpoch());
  // No thread may be waiting on the clock any more.
  ~SimulatedClock() override;

  absl::Time Now() const override;

  // Moves time forward by `d` (a negative `d` counts as zero: time never goes
  // back) and notifies the condition variable of
  // every waiter whose deadline is now reached. Returns once they have been
  // notified (not once they have run).
  void Advance(absl::Duration d);

  // Threads now blocked in WaitUntil with a finite deadline (waits for
  // InfiniteFuture are not counted: no time can end them).
  int64_t num_waiters() const;
  // Blocks until at least `n` threads are blocked in WaitUntil with a finite
  // deadline: the way a test knows that the threads it started have reached
  // their waits before it advances time.
  void AwaitWaiters(int64_t n) const;

 protected:
  bool WaitOnce(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                absl::Time deadline) override;

 private:
  struct Waiter {
    std::condition_variable* cv;
    std::mutex* mutex;  // the waiter's, which Advance locks to notify
    absl::Time deadline;
    int pins = 0;  // Advance calls about to notify it
  };

  mutable std::mutex mutex_;
  mutable std::condition_variable waiters_changed_;
  absl::Time now_;
  std::list<Waiter> waiters_;
};

}  // namespace retrace

#endif  // RETRACE_COMMON_CLOCK_H_

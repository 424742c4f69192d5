// The clocks: a SimulatedClock wakes exactly the waits its Advance makes due
// and nothing else, a notification still ends a wait, and the real clock's
// timed wait runs out on the system clock.
#include "common/clock.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/time/clock.h"

namespace retrace {
namespace {

const absl::Time kStart = absl::FromUnixSeconds(500);

// A thread waiting on `clock` until `deadline` or until `done` is set.
class Waiter {
 public:
  Waiter(Clock* clock, absl::Time deadline)
      : thread_([this, clock, deadline] {
          std::unique_lock<std::mutex> lock(mutex_);
          const bool done =
              clock->WaitUntil(cv_, lock, deadline, [&] { return done_; });
          result_ = done ? 1 : 0;
          returned_ = true;
          returned_cv_.notify_all();
        }) {}
  ~Waiter() { thread_.join(); }

  void SetDone() {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
    cv_.notify_all();
  }
  // 1: done() held, 0: the deadline passed; blocks until the wait returned.
  int AwaitResult() {
    std::unique_lock<std::mutex> lock(mutex_);
    returned_cv_.wait(lock, [&] { return returned_; });
    return result_;
  }
  bool returned() {
    std::lock_guard<std::mutex> lock(mutex_);
    return returned_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::condition_variable returned_cv_;
  bool done_ = false;
  bool returned_ = false;
  int result_ = -1;
  std::thread thread_;  // last: starts once the rest is constructed
};

TEST(SimulatedClockTest, AdvanceWakesOnlyTheWaitsItMakesDue) {
  SimulatedClock clock(kStart);
  Waiter early(&clock, kStart + absl::Seconds(1));
  Waiter late(&clock, kStart + absl::Seconds(2));
  clock.AwaitWaiters(2);
  EXPECT_EQ(clock.Now(), kStart);
  clock.Advance(absl::Seconds(1) - absl::Nanoseconds(1));
  EXPECT_FALSE(early.returned());
  clock.Advance(absl::Nanoseconds(1));
  EXPECT_EQ(early.AwaitResult(), 0);
  EXPECT_FALSE(late.returned());
  EXPECT_EQ(clock.Now(), kStart + absl::Seconds(1));
  clock.Advance(absl::Seconds(5));
  EXPECT_EQ(late.AwaitResult(), 0);
  EXPECT_EQ(clock.Now(), kStart + absl::Seconds(6));
}

TEST(SimulatedClockTest, ANotificationEndsTheWaitBeforeItsDeadline) {
  SimulatedClock clock(kStart);
  Waiter waiter(&clock, kStart + absl::Seconds(1));
  clock.AwaitWaiters(1);
  waiter.SetDone();
  EXPECT_EQ(waiter.AwaitResult(), 1);
  EXPECT_EQ(clock.Now(), kStart);
}

TEST(SimulatedClockTest, APassedDeadlineDoesNotWaitAndTimeNeverGoesBack) {
  SimulatedClock clock(kStart);
  clock.Advance(-absl::Seconds(3));
  EXPECT_EQ(clock.Now(), kStart);
  Waiter passed(&clock, kStart);
  EXPECT_EQ(passed.AwaitResult(), 0);
  EXPECT_EQ(clock.num_waiters(), 0);
}

TEST(SimulatedClockTest, AnEndlessWaitIsNotCountedAndIgnoresTime) {
  SimulatedClock clock(kStart);
  Waiter endless(&clock, absl::InfiniteFuture());
  clock.Advance(absl::Hours(24 * 365));
  EXPECT_EQ(clock.num_waiters(), 0);
  EXPECT_FALSE(endless.returned());
  endless.SetDone();
  EXPECT_EQ(endless.AwaitResult(), 1);
}

TEST(RealClockTest, ATimedWaitRunsOutOnTheSystemClock) {
  Clock* clock = Clock::Real();
  const absl::Time start = absl::Now();
  EXPECT_GE(clock->Now(), start);
  Waiter waiter(clock, start + absl::Milliseconds(20));
  EXPECT_EQ(waiter.AwaitResult(), 0);
  EXPECT_GE(absl::Now(), start + absl::Milliseconds(20));
  Waiter notified(clock, absl::InfiniteFuture());
  notified.SetDone();
  EXPECT_EQ(notified.AwaitResult(), 1);
}

}  // namespace
}  // namespace retrace

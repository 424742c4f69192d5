// Training progress on a terminal: a bar redrawn in place when the output is
// a TTY, otherwise one plain line every `line_interval_s` seconds (logs stay
// readable). Shows step/steps, the loss (exponential moving average),
// steps/s and the estimated time left.
//
// Not thread-safe: one reporter per training loop.
#ifndef RETRACE_JOBS_PROGRESS_H_
#define RETRACE_JOBS_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace retrace::jobs {

// "1h02m03s", "4m05s", "9s".
std::string FormatDuration(double seconds);

// One progress line without terminal control characters, e.g.
// "[#####.....] 300/600 loss 0.0812 3.41 steps/s ETA 1m28s". A bar is drawn
// when bar_width > 0; steps_per_second <= 0 shows "--" for the rate and ETA.
std::string FormatProgress(int64_t done, int64_t total, double loss_ema,
                           double steps_per_second, int bar_width);

class ProgressReporter {
 public:
  using Clock = std::chrono::steady_clock;

  // Reports on `out` (not owned; null disables reporting) the steps from
  // `start` (already done before, e.g. on resume) to `total`.
  ProgressReporter(std::FILE* out, bool is_tty, int64_t start, int64_t total,
                   double line_interval_s);

  // Called after each step with the number of steps now done and that step's
  // loss.
  void Update(int64_t done, double loss);
  // Final line (always printed, ends with a newline).
  void Finish();

  // The bias-corrected moving average of the losses so far (0 before any).
  double loss_ema() const;
  // Steps per second since construction; 0 before the first step.
  double steps_per_second() const;

 private:
  static constexpr double kEmaDecay = 0.95;
  static constexpr double kTtyRedrawSeconds = 0.1;
  static constexpr int kBarWidth = 24;

  void Print(bool final_line);

  std::FILE* out_;
  bool is_tty_;
  int64_t start_;
  int64_t total_;
  int64_t done_;
  double line_interval_s_;
  double loss_ema_ = 0;
  int64_t loss_count_ = 0;
  Clock::time_point start_time_;
  Clock::time_point last_print_;
};

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_PROGRESS_H_

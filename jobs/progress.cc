#include "jobs/progress.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace retrace::jobs {

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--";
  const int64_t total = static_cast<int64_t>(std::llround(seconds));
  const int64_t h = total / 3600, m = (total / 60) % 60, s = total % 60;
  if (h > 0) return absl::StrFormat("%dh%02dm%02ds", h, m, s);
  if (m > 0) return absl::StrFormat("%dm%02ds", m, s);
  return absl::StrFormat("%ds", s);
}

std::string FormatProgress(int64_t done, int64_t total, double loss_ema,
                           double steps_per_second, int bar_width) {
  std::string out;
  if (bar_width > 0) {
    const double fraction =
        total > 0 ? std::clamp(double(done) / double(total), 0.0, 1.0) : 1.0;
    const int filled = static_cast<int>(fraction * bar_width);
    out = absl::StrCat("[", std::string(filled, '#'),
                       std::string(bar_width - filled, '.'), "] ");
  }
  absl::StrAppend(&out, done, "/", total, " loss ",
                  absl::StrFormat("%.4f", loss_ema));
  if (steps_per_second > 0) {
    absl::StrAppend(&out, absl::StrFormat(" %.2f steps/s", steps_per_second),
                    " ETA ",
                    FormatDuration(double(total - done) / steps_per_second));
  } else {
    absl::StrAppend(&out, " -- steps/s ETA --");
  }
  return out;
}

ProgressReporter::ProgressReporter(std::FILE* out, bool is_tty, int64_t start,
                                   int64_t total, double line_interval_s)
    : out_(out),
      is_tty_(is_tty),
      start_(start),
      total_(total),
      done_(start),
      line_interval_s_(line_interval_s),
      start_time_(Clock::now()),
      last_print_(start_time_) {}

double ProgressReporter::steps_per_second() const {
  const double elapsed =
      std::chrono::duration<double>(Clock::now() - start_time_).count();
  return done_ > start_ && elapsed > 0 ? double(done_ - start_) / elapsed : 0;
}

double ProgressReporter::loss_ema() const {
  if (loss_count_ == 0) return 0;
  return loss_ema_ / (1 - std::pow(kEmaDecay, double(loss_count_)));
}

void ProgressReporter::Update(int64_t done, double loss) {
  done_ = done;
  ++loss_count_;
  loss_ema_ = kEmaDecay * loss_ema_ + (1 - kEmaDecay) * loss;
  if (out_ == nullptr) return;
  const double since_print =
      std::chrono::duration<double>(Clock::now() - last_print_).count();
  if (since_print >= (is_tty_ ? kTtyRedrawSeconds : line_interval_s_)) {
    Print(/*final_line=*/false);
  }
}

void ProgressReporter::Finish() {
  if (out_ == nullptr) return;
  Print(/*final_line=*/true);
}

void ProgressReporter::Print(bool final_line) {
  last_print_ = Clock::now();
  const std::string line = FormatProgress(
      done_, total_, loss_ema(), steps_per_second(), is_tty_ ? kBarWidth : 0);
  if (is_tty_) {
    // \r and erase-to-end-of-line redraw the bar in place.
    std::fprintf(out_, "\r%s\033[K%s", line.c_str(), final_line ? "\n" : "");
  } else {
    std::fprintf(out_, "train: %s\n", line.c_str());
  }
  std::fflush(out_);
}

}  // namespace retrace::jobs

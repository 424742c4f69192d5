#include "client/progress.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace retrace::client {

std::string FormatQueryProgress(int done, int total, absl::string_view image,
                                int bar_width) {
  std::string out;
  if (bar_width > 0) {
    const int filled =
        total > 0 ? std::clamp(done * bar_width / total, 0, bar_width) : 0;
    absl::StrAppend(&out, "[", std::string(filled, '#'),
                    std::string(bar_width - filled, '.'), "] ");
  }
  absl::StrAppend(&out, done, "/", total, " ", image);
  return out;
}

QueryProgress::QueryProgress(std::FILE* out, bool is_tty, int total)
    : out_(out), is_tty_(is_tty), total_(total) {}

void QueryProgress::Start(int index, absl::string_view image) {
  if (out_ == nullptr) return;
  if (is_tty_) {
    // \r and erase-to-end-of-line redraw the bar in place.
    std::fprintf(out_, "\r%s\x1b[K",
                 FormatQueryProgress(index, total_, image, kBarWidth).c_str());
    drawn_ = true;
  } else {
    std::fprintf(out_, "retrace query: %s\n",
                 FormatQueryProgress(index + 1, total_, image, 0).c_str());
  }
  std::fflush(out_);
}

void QueryProgress::Clear() {
  if (out_ == nullptr || !drawn_) return;
  std::fprintf(out_, "\r\x1b[K");
  std::fflush(out_);
  drawn_ = false;
}

}  // namespace retrace::client

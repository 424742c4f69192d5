// Progress of a query over several images, on stderr: a bar redrawn in place
// on a terminal, otherwise one plain line per image (logs stay readable).
// Results go to stdout, so the progress never mixes into --json output.
//
// Not thread-safe: one reporter per command.
#ifndef RETRACE_CLIENT_PROGRESS_H_
#define RETRACE_CLIENT_PROGRESS_H_

#include <cstdio>
#include <string>

#include "absl/strings/string_view.h"

namespace retrace::client {

// "[#####.....] 3/10 cat.png" with a bar of `bar_width` characters.
std::string FormatQueryProgress(int done, int total, absl::string_view image,
                                int bar_width);

class QueryProgress {
 public:
  // Reports on `out` (not owned; null disables reporting) the `total` images
  // of a query. `is_tty` selects the redrawn bar.
  QueryProgress(std::FILE* out, bool is_tty, int total);

  // Before image `index` (0-based) is sent.
  void Start(int index, absl::string_view image);
  // Removes the bar from a terminal before anything else is printed; a no-op
  // on logs.
  void Clear();

 private:
  static constexpr int kBarWidth = 20;
  std::FILE* out_;
  bool is_tty_;
  int total_;
  bool drawn_ = false;
};

}  // namespace retrace::client

#endif  // RETRACE_CLIENT_PROGRESS_H_

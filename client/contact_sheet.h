// The contact sheet: one PNG that shows a query image next to the training
// images each method credits for it, so that the difference between the
// methods is visible at a glance (TracIn tends to return the same
// high-gradient-norm images for every query; ReTrac returns images that look
// like the query).
//
// Layout (all sizes in pixels, from SheetOptions; docs/cli.md has a drawing):
//
//   +--------------------------------------------------------------+
//   | title                                                        |
//   | Query        | TracIn                 | ReTrac                |
//   | +----------+ | proponents             | proponents            |
//   | |  query   | | [#1] [#2] [#3] ...     | [#1] [#2] [#3] ...    |
//   | +----------+ | [#6] ...               | [#6] ...              |
//   | caption      | opponents (when asked) | opponents             |
//   |              | [#1] ...               | [#1] ...              |
//   +--------------------------------------------------------------+
//
// One panel per method in the response, in response order. Each list is a
// grid of min(k, columns) thumbnails per row; every thumbnail is scaled with
// nearest neighbour into a thumb_size box (an integer factor when it fits:
// 28x28 -> 84x84, 32x32 -> 64x64) and captioned with its rank, score and
// label. Images keep their colours: RGB(A) thumbnails and queries are drawn
// in colour (alpha dropped), gray ones in grey. Text uses a TrueType font
// (DejaVu Sans by default).
//
// Thread safety: the functions share no state; stb's decoder keeps a global
// failure reason, so concurrent calls may report each other's reasons.
#ifndef RETRACE_CLIENT_CONTACT_SHEET_H_
#define RETRACE_CLIENT_CONTACT_SHEET_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "retrace/v1/attribution.pb.h"

namespace retrace::client {

// Debian's fonts-dejavu-core.
inline constexpr char kDefaultSheetFont[] =
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

struct SheetOptions {
  std::string font_path = kDefaultSheetFont;  // a TrueType (.ttf) file
  int thumb_size = 84;   // box of each training thumbnail, 16..1024
  int query_size = 168;  // box of the query image, 16..2048
  int columns = 5;       // thumbnails per row of a list, 1..64
  std::string title;     // drawn at the top and under the query (its name)
};

// Fixed parts of the layout, in pixels.
inline constexpr int kSheetMargin = 16;         // around the whole sheet
inline constexpr int kSheetGap = 8;             // between thumbnails
inline constexpr int kSheetPanelGap = 24;       // between query and panels
inline constexpr int kSheetTitleHeight = 28;    // the title line
inline constexpr int kSheetHeaderHeight = 26;   // "Query" / "TracIn" / "ReTrac"
inline constexpr int kSheetSectionHeight = 20;  // "proponents" / "opponents"
inline constexpr int kSheetCaptionHeight = 30;  // two caption lines
inline constexpr int kSheetListGap = 12;  // between proponents and opponents

struct SheetSize {
  int width = 0;
  int height = 0;
};

// The sheet's size for lists of up to `k` samples (k >= 1), with or without
// opponents, and `num_methods` panels (1 or 2). With columns c = min(k,
// options.columns), rows r = ceil(k / c), T = thumb_size, Q = query_size:
//   panel_width  = c*T + (c-1)*kSheetGap
//   list_height  = kSheetSectionHeight + r*(T + kSheetCaptionHeight)
//                  + (r-1)*kSheetGap
//   panel_height = kSheetHeaderHeight + list_height
//                  [+ kSheetListGap + list_height with opponents]
//   query_height = kSheetHeaderHeight + Q + kSheetCaptionHeight
//   width  = 2*kSheetMargin + Q + num_methods*(kSheetPanelGap + panel_width)
//   height = 2*kSheetMargin + kSheetTitleHeight
//            + max(query_height, panel_height)
SheetSize ContactSheetSize(int k, bool opponents, int num_methods,
                           const SheetOptions& options);

// Checks the option ranges and that the font loads: InvalidArgument for a
// bad value or a file that is no TrueType font, NotFound for a missing font
// file (the message says how to install or choose one).
absl::Status ValidateSheetOptions(const SheetOptions& options);

// Renders `response` (its thumbnails, i.e. a response to a request with
// include_thumbnails) beside the query image (`query_image`: PNG or JPEG
// bytes) and returns the sheet as PNG bytes of ContactSheetSize(k,
// opponents, results_size, options), where k is the longest list in the
// response and opponents says whether any opponents list is non-empty. A
// missing or undecodable thumbnail or query image is drawn as a grey box
// saying so. InvalidArgument when the response has no results or a bad
// option; NotFound / InvalidArgument for the font as above.
absl::StatusOr<std::string> RenderContactSheet(
    const v1::AttributeResponse& response, absl::string_view query_image,
    const SheetOptions& options);

}  // namespace retrace::client

#endif  // RETRACE_CLIENT_CONTACT_SHEET_H_

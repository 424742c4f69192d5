#include "common/status.h"

#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace retrace {

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

std::string QuoteForError(absl::string_view text) {
  if (text.size() <= kQuotedPrefix) {
    return absl::StrCat("'", absl::CHexEscape(text), "'");
  }
  return absl::StrCat("'", absl::CHexEscape(text.substr(0, kQuotedPrefix)),
                      "\u2026' (", text.size(), " bytes)");
}

}  // namespace retrace

#include "server/service/page_token.h"

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace retrace::service {
namespace {

constexpr char kPrefix[] = "si1";
// Longer than any token this server writes ("si1:1:" and 19 digits).
constexpr size_t kMaxTokenBytes = 64;

}  // namespace

std::string EncodePageToken(const PageToken& token) {
  return absl::StrCat(kPrefix, ":", token.column, ":", token.offset);
}

absl::StatusOr<PageToken> DecodePageToken(absl::string_view text,
                                          int64_t num_samples) {
  PageToken token;
  bool ok = text.size() <= kMaxTokenBytes;
  if (ok) {
    const std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
    ok = parts.size() == 3 && parts[0] == kPrefix &&
         absl::SimpleAtoi(parts[1], &token.column) &&
         (token.column == 0 || token.column == 1) &&
         absl::SimpleAtoi(parts[2], &token.offset) && token.offset >= 0 &&
         token.offset <= num_samples;
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token ", QuoteForError(text),
                     " is not a token this server returned"));
  }
  return token;
}

}  // namespace retrace::service

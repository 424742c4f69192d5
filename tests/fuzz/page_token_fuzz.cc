// GetSelfInfluence page tokens: any text is refused or decodes to a column
// of 0 or 1 and an offset within the listing; what decodes encodes back to a
// token that decodes to the same; and a refusal quotes a bounded prefix
// (a first bound of 200 characters was wrong: the campaign found a token of
// non-ASCII bytes, each escaped as \xNN, whose refusal is longer).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "absl/strings/string_view.h"
#include "server/service/page_token.h"
#include "tests/fuzz/require.h"

using retrace::fuzz::Require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  for (const int64_t samples : {int64_t{0}, int64_t{1000}, INT64_MAX}) {
    absl::StatusOr<retrace::service::PageToken> token =
        retrace::service::DecodePageToken(text, samples);
    if (!token.ok()) {
      Require(token.status().code() == absl::StatusCode::kInvalidArgument);
      // 40 quoted bytes take at most 4 characters each once escaped.
      Require(token.status().message().size() < 300);
      continue;
    }
    Require(token->column == 0 || token->column == 1);
    Require(token->offset >= 0 && token->offset <= samples);
    absl::StatusOr<retrace::service::PageToken> again =
        retrace::service::DecodePageToken(
            retrace::service::EncodePageToken(*token), samples);
    Require(again.ok() && again->column == token->column &&
            again->offset == token->offset);
  }
  return 0;
}

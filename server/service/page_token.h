// The page tokens of GetSelfInfluence: "si1:<column>:<offset>", opaque to
// clients, which only hand back what a previous page returned.
#ifndef RETRACE_SERVER_SERVICE_PAGE_TOKEN_H_
#define RETRACE_SERVER_SERVICE_PAGE_TOKEN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace::service {

struct PageToken {
  int64_t column = 0;  // which self-influence listing (one per method)
  int64_t offset = 0;  // the first position of the next page
};

std::string EncodePageToken(const PageToken& token);

// Parses a token for a listing of `num_samples` positions: INVALID_ARGUMENT
// (quoting at most a short prefix of the token) unless it has the form above
// with a column of 0 or 1 and an offset in 0..num_samples.
absl::StatusOr<PageToken> DecodePageToken(absl::string_view text,
                                          int64_t num_samples);

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_PAGE_TOKEN_H_

// Status helpers used everywhere inside retrace.
//
// Errors are values: functions return absl::Status or absl::StatusOr<T>. The
// conversion to the wire's error type happens in exactly one place (the gRPC
// service layer). Kernel errors become absl::Status in
// server/core/kernel_status.h, so this header (and the CLI that uses it) does
// not depend on the kernels.
#ifndef RETRACE_COMMON_STATUS_H_
#define RETRACE_COMMON_STATUS_H_

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace {

// Prefixes the message of a non-ok status with `context` ("context: message"),
// keeping the code. Returns ok statuses unchanged.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

// How error messages quote text that came from outside (a request field, a
// file): in single quotes, non-printable bytes escaped, and cut to its first
// kQuotedPrefix bytes with the full length said when longer:
//   'abc'   'AAAAAAAA…' (100000 bytes)
// so a hostile client cannot make an error (and the gRPC status metadata
// that carries it) as large as its request.
inline constexpr size_t kQuotedPrefix = 40;
std::string QuoteForError(absl::string_view text);

}  // namespace retrace

#define RETRACE_STATUS_CONCAT_INNER_(a, b) a##b
#define RETRACE_STATUS_CONCAT_(a, b) RETRACE_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function
// when it is not ok.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status _retrace_status = (expr);           \
    if (!_retrace_status.ok()) return _retrace_status; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, else
// moves the value into `lhs` (which may be a declaration: `auto x`).
#define ASSIGN_OR_RETURN(lhs, rexpr)                                           \
  ASSIGN_OR_RETURN_IMPL_(RETRACE_STATUS_CONCAT_(_retrace_sor_, __LINE__), lhs, \
                         rexpr)
#define ASSIGN_OR_RETURN_IMPL_(sor, lhs, rexpr) \
  auto sor = (rexpr);                           \
  if (!sor.ok()) return sor.status();           \
  lhs = std::move(sor).value()

#endif  // RETRACE_COMMON_STATUS_H_

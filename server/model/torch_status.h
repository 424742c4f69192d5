// Internal to retrace_model: runs LibTorch code and turns its exceptions into
// absl::Status. Include only from .cc files that already include LibTorch.
#ifndef RETRACE_SERVER_MODEL_TORCH_STATUS_H_
#define RETRACE_SERVER_MODEL_TORCH_STATUS_H_

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace retrace::model::internal {

// c10::Error text carries a C++ backtrace after the first line; keep the
// message only.
inline std::string FirstLine(const char* what) {
  std::string text(what);
  const size_t newline = text.find('\n');
  if (newline != std::string::npos) text.resize(newline);
  return text;
}

// Calls fn() (returning absl::StatusOr<T> or absl::Status) and maps exceptions:
// out of memory -> RESOURCE_EXHAUSTED, c10::Error from argument checks ->
// INVALID_ARGUMENT, anything else -> INTERNAL. `context` prefixes the message.
template <typename Fn>
auto CallTorch(absl::string_view context, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of memory"));
  } catch (const c10::IndexError& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", FirstLine(e.what_without_backtrace())));
  } catch (const c10::ValueError& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", FirstLine(e.what_without_backtrace())));
  } catch (const c10::TypeError& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", FirstLine(e.what_without_backtrace())));
  } catch (const c10::Error& e) {
    const std::string message = FirstLine(e.what_without_backtrace());
    if (message.find("out of memory") != std::string::npos) {
      return absl::ResourceExhaustedError(absl::StrCat(context, ": ", message));
    }
    return absl::InternalError(absl::StrCat(context, ": ", message));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat(context, ": ", FirstLine(e.what())));
  }
}

}  // namespace retrace::model::internal

#endif  // RETRACE_SERVER_MODEL_TORCH_STATUS_H_

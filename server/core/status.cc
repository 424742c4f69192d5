#include "server/core/status.h"

#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace retrace {

absl::Status FromKernelStatus(const kernels::KernelStatus& status) {
  using kernels::KernelCode;
  switch (status.code()) {
    case KernelCode::kOk:
      return absl::OkStatus();
    case KernelCode::kInvalidArgument:
      return absl::InvalidArgumentError(status.message());
    case KernelCode::kOutOfMemory:
      return absl::ResourceExhaustedError(status.message());
    case KernelCode::kUnavailable:
      return absl::UnavailableError(status.message());
    case KernelCode::kDeviceError:
      return absl::InternalError(
          absl::StrCat("device error: ", status.message()));
    case KernelCode::kInternal:
      return absl::InternalError(status.message());
  }
  return absl::InternalError(status.message());
}

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

// model.toml, the description of a user's model: any text is refused with
// INVALID_ARGUMENT or parses to a description that formats to TOML which
// parses back to an equal formatting (the round trip that `retrace-batch
// train` relies on when it writes one). Parsing touches no file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/string_view.h"
#include "server/run/model_description.h"
#include "tests/fuzz/require.h"

using retrace::fuzz::Require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<retrace::run::ModelDescription> description =
      retrace::run::ParseModelDescription(text, "/fuzz/model.toml");
  if (!description.ok()) {
    Require(description.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  const std::string formatted =
      retrace::run::FormatModelDescription(*description);
  absl::StatusOr<retrace::run::ModelDescription> again =
      retrace::run::ParseModelDescription(formatted, "/fuzz/model.toml");
  Require(again.ok());
  Require(retrace::run::FormatModelDescription(*again) == formatted);
  return 0;
}

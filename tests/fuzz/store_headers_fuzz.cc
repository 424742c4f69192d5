// The store's headers as a damaged or hostile store would present them: the
// first byte picks manifest.json (even) or a safetensors file (odd), the rest
// is the file. Properties: no crash or sanitizer report; a manifest that
// parses also validates and serializes to text that parses to the same
// store_id; a safetensors header that parses tiles exactly the file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/string_view.h"
#include "server/store/manifest.h"
#include "server/store/safetensors.h"
#include "tests/fuzz/require.h"

using retrace::fuzz::Require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t* body = data + 1;
  const size_t body_size = size - 1;
  if (data[0] % 2 == 0) {
    const absl::string_view text(reinterpret_cast<const char*>(body),
                                 body_size);
    absl::StatusOr<retrace::store::Manifest> manifest =
        retrace::store::Manifest::Parse(text);
    if (!manifest.ok()) return 0;
    Require(manifest->Validate().ok());
    absl::StatusOr<std::string> again = manifest->Serialize();
    if (again.ok()) {
      absl::StatusOr<retrace::store::Manifest> reparsed =
          retrace::store::Manifest::Parse(*again);
      Require(reparsed.ok() && reparsed->store_id == manifest->store_id);
    }
    return 0;
  }
  absl::StatusOr<retrace::store::SafetensorsHeader> header =
      retrace::store::ParseSafetensorsHeader(
          body, static_cast<int64_t>(body_size), "shard.safetensors");
  if (!header.ok()) {
    Require(header.status().code() == absl::StatusCode::kDataLoss ||
            header.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  Require(header->data_start + header->data_size ==
          static_cast<int64_t>(body_size));
  return 0;
}

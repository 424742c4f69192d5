// Encoding and parsing of safetensors headers.
//
// A safetensors file is: an 8-byte little-endian unsigned header length L, L
// bytes of JSON, then the data section. The JSON maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// data section) plus an optional "__metadata__" object of string values.
// retrace pads the JSON with trailing spaces so that the data section starts at
// a multiple of kSafetensorsAlignment, which the format allows and the
// `safetensors` Python package also does.
//
// These functions are pure and thread-safe. See docs/store-format.md.
#ifndef RETRACE_SERVER_STORE_SAFETENSORS_H_
#define RETRACE_SERVER_STORE_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace::store {

inline constexpr int64_t kSafetensorsAlignment = 8;
// Headers larger than this are refused as malformed (the safetensors package
// uses the same bound), so a corrupt length cannot make us allocate gigabytes.
inline constexpr int64_t kMaxSafetensorsHeaderBytes = 100 << 20;

struct TensorEntry {
  std::string name;
  std::string
      dtype;  // safetensors spelling: "F16", "BF16", "F32", "I32", "I64", ...
  std::vector<int64_t> shape;
  int64_t begin = 0;  // data_offsets, relative to the start of the data section
  int64_t end = 0;
};

struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;  // sorted by `begin`
  std::map<std::string, std::string> metadata;
  int64_t data_start = 0;  // file offset of the data section: 8 + L
  int64_t data_size = 0;   // bytes of the data section

  // Null when no tensor has this name.
  const TensorEntry* Find(absl::string_view name) const;
};

// Bytes per element of a safetensors dtype name; 0 when the name is unknown.
int64_t SafetensorsDTypeSize(absl::string_view dtype);

// Returns the 8-byte length prefix followed by the padded JSON header, so that
// the data section (which the caller writes next) starts at a multiple of
// kSafetensorsAlignment. Tensors must be listed with contiguous offsets
// starting at 0; JSON keys are sorted so that the output is deterministic.
// InvalidArgument when offsets are not contiguous or sizes disagree with
// shape and dtype.
absl::StatusOr<std::string> EncodeSafetensorsHeader(
    const std::vector<TensorEntry>& tensors,
    const std::map<std::string, std::string>& metadata);

// Parses the header of a safetensors file held in `bytes` (the whole file,
// `file_size` bytes). Checks that the JSON is well formed, every tensor has a
// known dtype, a non-negative shape and offsets that match shape x dtype, that
// the tensors tile the data section without holes or overlaps, and that the
// data section ends exactly at the end of the file. Errors are DataLoss and
// begin with `file_name` (for messages such as
// "shard-00002.safetensors: truncated: ...").
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(
    const uint8_t* bytes, int64_t file_size, absl::string_view file_name);

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_SAFETENSORS_H_

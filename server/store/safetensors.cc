#include "server/store/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "common/status.h"

namespace retrace::store {
namespace {

using nlohmann::json;

constexpr char kMetadataKey[] = "__metadata__";

// Product of non-negative factors with overflow detection.
bool CheckedProduct(const std::vector<int64_t>& factors, int64_t* out) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(p, f, &p)) return false;
  }
  *out = p;
  return true;
}

// A JSON number that is a non-negative integer fitting in int64.
bool AsNonNegativeInt64(const json& j, int64_t* out) {
  if (j.is_number_unsigned()) {
    uint64_t u = j.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
    *out = int64_t(u);
    return true;
  }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = v;
    return true;
  }
  return false;
}

}  // namespace

const TensorEntry* SafetensorsHeader::Find(absl::string_view name) const {
  for (const TensorEntry& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

int64_t SafetensorsDTypeSize(absl::string_view dtype) {
  struct Entry {
    const char* name;
    int64_t size;
  };
  static constexpr Entry kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  for (const Entry& e : kSizes) {
    if (dtype == e.name) return e.size;
  }
  return 0;
}

absl::StatusOr<std::string> EncodeSafetensorsHeader(
    const std::vector<TensorEntry>& tensors,
    const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  int64_t expected_begin = 0;
  for (const TensorEntry& t : tensors) {
    int64_t element_size = SafetensorsDTypeSize(t.dtype);
    int64_t elements = 0;
    if (element_size == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "': unknown dtype '", t.dtype, "'"));
    }
    if (!CheckedProduct(t.shape, &elements) ||
        __builtin_mul_overflow(elements, element_size, &elements) ||
        t.begin != expected_begin || t.end - t.begin != elements) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end,
          "] do not follow the previous tensor or disagree with its shape"));
    }
    if (t.name == kMetadataKey || header.contains(t.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor name '", t.name, "' is reserved or repeated"));
    }
    expected_begin = t.end;
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {t.begin, t.end}}};
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header cannot be encoded: ", e.what()));
  }
  int64_t padded = int64_t(text.size());
  padded += (kSafetensorsAlignment - (8 + padded) % kSafetensorsAlignment) %
            kSafetensorsAlignment;
  text.resize(size_t(padded), ' ');
  std::string out(8, '\0');
  uint64_t length = uint64_t(padded);
  for (int i = 0; i < 8; ++i) out[i] = char((length >> (8 * i)) & 0xff);
  out += text;
  return out;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(
    const uint8_t* bytes, int64_t file_size, absl::string_view file_name) {
  auto data_loss = [&](auto&&... parts) {
    return absl::DataLossError(absl::StrCat(file_name, ": ", parts...));
  };
  if (file_size < 8) {
    return data_loss("truncated: ", file_size,
                     " bytes, shorter than the 8-byte header length");
  }
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t(bytes[i]) << (8 * i);
  if (length > uint64_t(kMaxSafetensorsHeaderBytes)) {
    return data_loss("malformed safetensors header: header length ", length,
                     " exceeds the limit of ", kMaxSafetensorsHeaderBytes);
  }
  if (int64_t(length) > file_size - 8) {
    return data_loss("truncated: header length ", length,
                     " but the file holds ", file_size - 8,
                     " bytes after the length");
  }
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes) + 8,
                         reinterpret_cast<const char*>(bytes) + 8 + length);
  } catch (const json::exception& e) {
    return data_loss("malformed safetensors header: ", e.what());
  }
  if (!header.is_object()) {
    return data_loss("malformed safetensors header: not a JSON object");
  }
  SafetensorsHeader out;
  out.data_start = 8 + int64_t(length);
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) {
        return data_loss(
            "malformed safetensors header: '__metadata__' is not an object");
      }
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          return data_loss("malformed safetensors header: '__metadata__.", k,
                           "' is not a string");
        }
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    // (A structured binding cannot be captured before C++20.)
    const std::string quoted = QuoteForError(name);
    auto bad = [&](absl::string_view what) {
      return data_loss("malformed safetensors header: tensor ", quoted, ": ",
                       what);
    };
    if (!value.is_object()) return bad("entry is not an object");
    TensorEntry t;
    t.name = name;
    auto dtype = value.find("dtype");
    if (dtype == value.end() || !dtype->is_string())
      return bad("'dtype' missing");
    t.dtype = dtype->get<std::string>();
    int64_t element_size = SafetensorsDTypeSize(t.dtype);
    if (element_size == 0)
      return bad(absl::StrCat("unknown dtype '", t.dtype, "'"));
    auto shape = value.find("shape");
    if (shape == value.end() || !shape->is_array())
      return bad("'shape' missing");
    for (const json& dim : *shape) {
      int64_t d;
      if (!AsNonNegativeInt64(dim, &d))
        return bad("'shape' holds a non-integer");
      t.shape.push_back(d);
    }
    auto offsets = value.find("data_offsets");
    if (offsets == value.end() || !offsets->is_array() ||
        offsets->size() != 2 || !AsNonNegativeInt64((*offsets)[0], &t.begin) ||
        !AsNonNegativeInt64((*offsets)[1], &t.end) || t.end < t.begin) {
      return bad(
          "'data_offsets' must be two integers [begin, end], begin <= end");
    }
    int64_t bytes_needed = 0;
    if (!CheckedProduct(t.shape, &bytes_needed) ||
        __builtin_mul_overflow(bytes_needed, element_size, &bytes_needed) ||
        bytes_needed != t.end - t.begin) {
      return bad(absl::StrCat("data_offsets [", t.begin, ", ", t.end,
                              "] disagree with shape and dtype ", t.dtype));
    }
    out.tensors.push_back(std::move(t));
  }
  std::sort(out.tensors.begin(), out.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  int64_t expected = 0;
  for (const TensorEntry& t : out.tensors) {
    if (t.begin != expected) {
      return data_loss(
          "malformed safetensors header: tensor '", t.name,
          "' starts at data offset ", t.begin, ", expected ", expected,
          " (tensors must tile the data section without holes or overlaps)");
    }
    expected = t.end;
  }
  out.data_size = expected;
  int64_t available = file_size - out.data_start;
  if (available < out.data_size) {
    return data_loss("truncated: the header describes ", out.data_size,
                     " data bytes but the file holds ", available);
  }
  if (available > out.data_size) {
    return data_loss("malformed safetensors file: ", available - out.data_size,
                     " bytes follow the last tensor");
  }
  return out;
}

}  // namespace retrace::store

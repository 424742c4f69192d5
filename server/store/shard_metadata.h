// The "__metadata__" keys the retrace writer puts in every shard, and small
// helpers to check a parsed shard header against what the writer would have
// produced. Internal to retrace_store (shared by the writer, which recognizes
// its own shards when resuming, and the join of a build in parts).
#ifndef RETRACE_SERVER_STORE_SHARD_METADATA_H_
#define RETRACE_SERVER_STORE_SHARD_METADATA_H_

#include <string>
#include <vector>

#include "server/store/safetensors.h"

namespace retrace::store {

inline constexpr char kMetaFormat[] = "format";
inline constexpr char kMetaFormatVersion[] = "format_version";
inline constexpr char kMetaShardIndex[] = "shard_index";
inline constexpr char kMetaFirst[] = "first";
inline constexpr char kMetaSpecSha256[] = "spec_sha256";
inline constexpr char kMetaDataSha256[] = "data_sha256";

// The metadata value under `key`, or "" when absent.
inline std::string MetadataOr(const SafetensorsHeader& header,
                              const char* key) {
  auto it = header.metadata.find(key);
  return it == header.metadata.end() ? std::string() : it->second;
}

// Same names, dtypes, shapes and offsets, in the same order.
inline bool SameTensors(const std::vector<TensorEntry>& a,
                        const std::vector<TensorEntry>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].dtype != b[i].dtype ||
        a[i].shape != b[i].shape || a[i].begin != b[i].begin ||
        a[i].end != b[i].end) {
      return false;
    }
  }
  return true;
}

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_SHARD_METADATA_H_

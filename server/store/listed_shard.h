// Opening a shard file that a manifest or a part record lists, with the
// errors the reader and the join both report. Internal to retrace_store.
#ifndef RETRACE_SERVER_STORE_LISTED_SHARD_H_
#define RETRACE_SERVER_STORE_LISTED_SHARD_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/file_util.h"

namespace retrace::store {

// Maps the shard at `path`, which `field` (e.g. "manifest.json shards[3]")
// lists, through `env`. NotFound "<path>: missing (listed in <field>)" when
// it is absent.
absl::StatusOr<std::unique_ptr<MappedFile>> MapListedShard(
    Env* env, const std::string& path, const std::string& field);

// DataLoss "<path>: checksum mismatch: <field>.sha256 expects <expected>, the
// file has <actual>" unless the mapped file's sha256 is `expected`.
absl::Status VerifyShardChecksum(const MappedFile& file,
                                 const std::string& field,
                                 const std::string& expected);

}  // namespace retrace::store

#endif  // RETRACE_SERVER_STORE_LISTED_SHARD_H_

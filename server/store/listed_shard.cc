#include "server/store/listed_shard.h"

#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace retrace::store {

absl::StatusOr<std::unique_ptr<MappedFile>> MapListedShard(
    Env* env, const std::string& path, const std::string& field) {
  absl::StatusOr<std::unique_ptr<MappedFile>> map = env->MapFile(path);
  if (absl::IsNotFound(map.status())) {
    return absl::NotFoundError(
        absl::StrCat(path, ": missing (listed in ", field, ")"));
  }
  return map;
}

absl::Status VerifyShardChecksum(const MappedFile& file,
                                 const std::string& field,
                                 const std::string& expected) {
  Sha256 hash;
  hash.Update(file.data(), size_t(file.size()));
  const std::string actual = hash.HexDigest();
  if (actual != expected) {
    return absl::DataLossError(
        absl::StrCat(file.path(), ": checksum mismatch: ", field,
                     ".sha256 expects ", expected, ", the file has ", actual));
  }
  return absl::OkStatus();
}

}  // namespace retrace::store

// SHA-256 of files and buffers, as lowercase hex (64 characters).
#ifndef RETRACE_COMMON_SHA256_H_
#define RETRACE_COMMON_SHA256_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace {

// Incremental hasher. Not thread-safe; one per thread.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  // Returns the hex digest; the hasher must not be updated afterwards.
  std::string HexDigest();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

std::string Sha256Hex(absl::string_view data);

// Hashes a whole file, streaming it in blocks. NotFound / DataLoss errors name
// the path.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace retrace

#endif  // RETRACE_COMMON_SHA256_H_

// File helpers for job outputs: atomic writes, whole-file reads, a directory
// lock. Errors are absl::Status values whose message names the path.
#ifndef RETRACE_JOBS_FILE_UTIL_H_
#define RETRACE_JOBS_FILE_UTIL_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace::jobs {

// Suffix of the temporary files that become the final file on commit.
inline constexpr char kTempSuffix[] = ".tmp";

// Makes `path` durable under its final name: fsyncs `temp_path`, renames it
// over `path`, then fsyncs the directory so the rename survives a crash.
// A crash at any moment leaves either the old file or the complete new one.
absl::Status CommitFile(const std::string& temp_path, const std::string& path);

// Writes `bytes` to path + kTempSuffix and commits it as `path`.
absl::Status WriteFileAtomically(const std::string& path,
                                 absl::string_view bytes);

// Reads a whole file. NOT_FOUND when it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Creates `dir` (and parents) if needed and checks that files can be created
// in it. PERMISSION_DENIED / FAILED_PRECONDITION say which directory and why.
absl::Status EnsureWritableDirectory(const std::string& dir);

// An exclusive advisory lock (flock) on a directory, released on destruction,
// so that two jobs cannot write into the same directory at once.
class DirectoryLock {
 public:
  // FAILED_PRECONDITION when another process holds the lock.
  static absl::StatusOr<std::unique_ptr<DirectoryLock>> Acquire(
      const std::string& dir);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  explicit DirectoryLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_FILE_UTIL_H_

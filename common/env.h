// The file operations that storage performs, behind one interface so that
// tests can inject disk errors and simulated crashes (LevelDB's Env).
//
//   Env* env = Env::Default();                 // POSIX
//   ASSIGN_OR_RETURN(auto file, env->NewWritableFile(dir + "/x.tmp"));
//   RETURN_IF_ERROR(file->Append(bytes));
//   RETURN_IF_ERROR(file->Sync());
//   RETURN_IF_ERROR(file->Close());
//   RETURN_IF_ERROR(env->RenameFile(dir + "/x.tmp", dir + "/x"));
//   RETURN_IF_ERROR(env->SyncDirectory(dir));
//
// Code that writes files takes an Env* (an options field or a parameter that
// defaults to Env::Default()); the caller owns it and keeps it alive while
// the code runs. Nothing mutates a global Env.
//
// Errors: every failed call returns a Status whose message names the
// operation and the path, and the errno with its symbolic name:
//   "fsync of 'x/shard-00001.safetensors': Input/output error (EIO)".
// Codes: ENOENT -> NotFound, EACCES/EPERM -> PermissionDenied, ENOSPC/EDQUOT
// -> ResourceExhausted, anything else -> Internal (see IoError below).
//
// Thread safety: Env::Default() is stateless and safe to use from any thread.
// A WritableFile belongs to one thread at a time.
#ifndef RETRACE_COMMON_ENV_H_
#define RETRACE_COMMON_ENV_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace {

class MappedFile;  // common/file_util.h

// A file opened for writing. Bytes appended are in the operating system's
// cache until Sync returns ok; only then do they survive a power loss.
class WritableFile {
 public:
  // Closes the file when Close was not called, ignoring errors.
  virtual ~WritableFile() = default;

  // Writes all of `data` at the end of the file.
  virtual absl::Status Append(absl::string_view data) = 0;
  // fsync: makes everything appended so far durable.
  virtual absl::Status Sync() = 0;
  // Releases the descriptor. Calling any method afterwards is an error
  // (FailedPrecondition).
  virtual absl::Status Close() = 0;
  virtual const std::string& path() const = 0;
};

class Env {
 public:
  virtual ~Env() = default;

  // The POSIX implementation; never null, never destroyed.
  static Env* Default();

  // Creates `path` (mode 0644) or truncates it, for writing.
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(
      const std::string& path) = 0;
  // Opens an existing file (written by another library, e.g. LibTorch's save)
  // and fsyncs it.
  virtual absl::Status SyncFile(const std::string& path) = 0;
  // rename(2): atomically replaces `to` when it exists. Durable once the
  // directory holding both is synced.
  virtual absl::Status RenameFile(const std::string& from,
                                  const std::string& to) = 0;
  // Removes a file; ok when it does not exist.
  virtual absl::Status RemoveFile(const std::string& path) = 0;
  // Creates `dir` and missing parents; ok when it exists as a directory,
  // FailedPrecondition when it exists as something else.
  virtual absl::Status CreateDirectories(const std::string& dir) = 0;
  // fsync of a directory, making creations, renames and removals in it
  // durable.
  virtual absl::Status SyncDirectory(const std::string& dir) = 0;

  // Reads a whole file. NotFound when it does not exist.
  virtual absl::StatusOr<std::string> ReadFile(const std::string& path) = 0;
  // A read-only shared map of a whole file. NotFound when it does not exist.
  virtual absl::StatusOr<std::unique_ptr<MappedFile>> MapFile(
      const std::string& path) = 0;
  // Entry names without "." and "..", sorted.
  virtual absl::StatusOr<std::vector<std::string>> ListDirectory(
      const std::string& dir) = 0;
  // False (not an error) when nothing exists at `path`.
  virtual absl::StatusOr<bool> FileExists(const std::string& path) = 0;
  virtual absl::StatusOr<int64_t> GetFileSize(const std::string& path) = 0;
};

// The Status for a failed `operation` on `path` with errno `err`:
// "<operation> of '<path>': <strerror> (<ENAME>)", code as described above.
absl::Status IoError(absl::string_view operation, absl::string_view path,
                     int err);

}  // namespace retrace

#endif  // RETRACE_COMMON_ENV_H_

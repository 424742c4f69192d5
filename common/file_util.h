// Small file helpers shared by the store and the offline jobs: atomic
// writes, whole-file reads, directory listing, read-only maps and advisory
// locks. The helpers that take an Env* do their I/O through it (env.h);
// the overloads without one use Env::Default(). Errors are absl::Status
// values whose message names the operation and the path.
// Thread-safe (no shared state); each lock object belongs to one owner.
#ifndef RETRACE_COMMON_FILE_UTIL_H_
#define RETRACE_COMMON_FILE_UTIL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/env.h"

namespace retrace {

// Suffix of the temporary file that WriteFileAtomically renames into place.
inline constexpr char kTempSuffix[] = ".tmp";

// Writes the concatenation of `pieces` to dir/name so that a crash at any
// moment leaves either no file or the complete one: the bytes go to
// dir/name.tmp, which is fsynced, renamed over dir/name, and then the
// directory is fsynced so that the rename itself is durable. On an error
// before the rename the temporary file is removed (best effort) and `path`
// is untouched; an error from the directory fsync comes after the rename.
absl::Status WriteFileAtomically(Env* env, const std::string& dir,
                                 const std::string& name,
                                 absl::Span<const absl::string_view> pieces);
absl::Status WriteFileAtomically(const std::string& dir,
                                 const std::string& name,
                                 absl::Span<const absl::string_view> pieces);

// Writes `bytes` to path + kTempSuffix and commits it as `path` (the same
// guarantees as above).
absl::Status WriteFileAtomically(Env* env, const std::string& path,
                                 absl::string_view bytes);
absl::Status WriteFileAtomically(const std::string& path,
                                 absl::string_view bytes);

// Makes `path` durable under its final name: fsyncs `temp_path`, renames it
// over `path`, then fsyncs the directory so the rename survives a crash. For
// files written by other libraries (e.g. LibTorch's save) to a temporary name.
// When the fsync or the rename fails, `path` keeps its earlier contents.
absl::Status CommitFile(Env* env, const std::string& temp_path,
                        const std::string& path);
absl::Status CommitFile(const std::string& temp_path, const std::string& path);

// Reads a whole file into memory. NotFound when it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Creates `dir` (and parents) if needed and checks that files can be created
// in it. PermissionDenied / FailedPrecondition say which directory and why.
absl::Status EnsureWritableDirectory(Env* env, const std::string& dir);
absl::Status EnsureWritableDirectory(const std::string& dir);

// Names of the entries of `dir` (without "." and ".."), sorted.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir);

// Removes dir/name; ok when it does not exist.
absl::Status RemoveFile(Env* env, const std::string& dir,
                        const std::string& name);
absl::Status RemoveFile(const std::string& dir, const std::string& name);

// fsync of a directory, making renames and removals in it durable.
absl::Status SyncDirectory(const std::string& dir);

// A read-only, shared memory map of a whole file, unmapped on destruction.
// Immutable after Open, so concurrent reads are safe.
class MappedFile {
 public:
  // NotFound when the file does not exist; empty files map to data() == null.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(
      const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, int64_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_;
  int64_t size_;
};

// An advisory lock (flock) on a directory, released on destruction, so that
// two jobs never write into one directory at once. The store uses both modes:
// a whole-store build and a join hold it exclusively; the writers of a build
// in parts each hold it shared (and their own part's FileLock exclusively),
// so that parts run side by side but never next to a whole-store build or a
// join.
class DirectoryLock {
 public:
  enum class Mode { kExclusive, kShared };

  // FailedPrecondition when a conflicting lock is held by another process or
  // object; its message is "<dir>: <holder> holds this directory", where
  // `holder` describes who the conflicting owner would be.
  static absl::StatusOr<std::unique_ptr<DirectoryLock>> Acquire(
      const std::string& dir, Mode mode = Mode::kExclusive,
      absl::string_view holder = "another job");
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  explicit DirectoryLock(int fd) : fd_(fd) {}
  int fd_;
};

// An exclusive advisory lock (flock) on a lock file, created when missing and
// left in place on release (removing a lock file someone may be about to open
// would let two holders lock two different files).
class FileLock {
 public:
  // FailedPrecondition when another process or object holds the lock.
  static absl::StatusOr<std::unique_ptr<FileLock>> Acquire(
      const std::string& path);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace retrace

#endif  // RETRACE_COMMON_FILE_UTIL_H_

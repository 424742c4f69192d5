#include "common/file_util.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace retrace {
namespace {

// Closes `fd` on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  int fd_;
};

std::string ParentDirectory(const std::string& path) {
  const std::string parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

}  // namespace

absl::Status SyncDirectory(const std::string& dir) {
  return Env::Default()->SyncDirectory(dir);
}

absl::Status WriteFileAtomically(Env* env, const std::string& dir,
                                 const std::string& name,
                                 absl::Span<const absl::string_view> pieces) {
  const std::string path = absl::StrCat(dir, "/", name);
  const std::string temp = absl::StrCat(path, kTempSuffix);
  ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file,
                   env->NewWritableFile(temp));
  absl::Status status;
  for (absl::string_view piece : pieces) {
    status = file->Append(piece);
    if (!status.ok()) break;
  }
  if (status.ok()) status = file->Sync();
  if (absl::Status closed = file->Close(); status.ok()) status = closed;
  if (status.ok()) status = env->RenameFile(temp, path);
  if (!status.ok()) {
    // The first error is the one worth reporting.
    env->RemoveFile(temp).IgnoreError();
    return status;
  }
  return env->SyncDirectory(dir);
}

absl::Status WriteFileAtomically(const std::string& dir,
                                 const std::string& name,
                                 absl::Span<const absl::string_view> pieces) {
  return WriteFileAtomically(Env::Default(), dir, name, pieces);
}

absl::Status WriteFileAtomically(Env* env, const std::string& path,
                                 absl::string_view bytes) {
  const absl::string_view pieces[] = {bytes};
  return WriteFileAtomically(env, ParentDirectory(path),
                             std::filesystem::path(path).filename().string(),
                             pieces);
}

absl::Status WriteFileAtomically(const std::string& path,
                                 absl::string_view bytes) {
  return WriteFileAtomically(Env::Default(), path, bytes);
}

absl::Status CommitFile(Env* env, const std::string& temp_path,
                        const std::string& path) {
  RETURN_IF_ERROR(env->SyncFile(temp_path));
  RETURN_IF_ERROR(env->RenameFile(temp_path, path));
  return env->SyncDirectory(ParentDirectory(path));
}

absl::Status CommitFile(const std::string& temp_path, const std::string& path) {
  return CommitFile(Env::Default(), temp_path, path);
}

absl::Status EnsureWritableDirectory(Env* env, const std::string& dir) {
  RETURN_IF_ERROR(env->CreateDirectories(dir));
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return IoError("write access to directory", dir, errno);
  }
  return absl::OkStatus();
}

absl::Status EnsureWritableDirectory(const std::string& dir) {
  return EnsureWritableDirectory(Env::Default(), dir);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return Env::Default()->ReadFile(path);
}

absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir) {
  return Env::Default()->ListDirectory(dir);
}

absl::Status RemoveFile(Env* env, const std::string& dir,
                        const std::string& name) {
  return env->RemoveFile(absl::StrCat(dir, "/", name));
}

absl::Status RemoveFile(const std::string& dir, const std::string& name) {
  return RemoveFile(Env::Default(), dir, name);
}

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(
    const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return IoError("open", path, errno);
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return IoError("stat", path, errno);
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a regular file"));
  }
  const int64_t size = int64_t(st.st_size);
  if (size == 0)
    return std::unique_ptr<MappedFile>(new MappedFile(path, nullptr, 0));
  void* p = ::mmap(nullptr, size_t(size), PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return IoError("mmap", path, errno);
  // The mapping stays valid after the descriptor is closed.
  return std::unique_ptr<MappedFile>(
      new MappedFile(path, static_cast<const uint8_t*>(p), size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_t(size_));
}

absl::StatusOr<std::unique_ptr<DirectoryLock>> DirectoryLock::Acquire(
    const std::string& dir, Mode mode, absl::string_view holder) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return IoError("open directory", dir, errno);
  const int operation = mode == Mode::kExclusive ? LOCK_EX : LOCK_SH;
  if (::flock(fd, operation | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, ": ", holder, " holds this directory"));
    }
    return IoError("lock", dir, err);
  }
  return std::unique_ptr<DirectoryLock>(new DirectoryLock(fd));
}

DirectoryLock::~DirectoryLock() { ::close(fd_); }  // closing releases the flock

absl::StatusOr<std::unique_ptr<FileLock>> FileLock::Acquire(
    const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return IoError("open lock file", path, errno);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": another store build holds this lock"));
    }
    return IoError("lock", path, err);
  }
  return std::unique_ptr<FileLock>(new FileLock(fd));
}

FileLock::~FileLock() { ::close(fd_); }

}  // namespace retrace

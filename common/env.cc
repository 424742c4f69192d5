#include "common/env.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"

namespace retrace {

absl::Status IoError(absl::string_view operation, absl::string_view path,
                     int err) {
  const char* name = ::strerrorname_np(err);
  std::string message =
      absl::StrCat(operation, " of '", path, "': ", std::strerror(err), " (",
                   name != nullptr ? name : absl::StrCat("errno ", err), ")");
  if (err == ENOENT) return absl::NotFoundError(message);
  if (err == EACCES || err == EPERM)
    return absl::PermissionDeniedError(message);
  if (err == ENOSPC || err == EDQUOT)
    return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

namespace {

class PosixWritableFile : public WritableFile {
 public:
  PosixWritableFile(std::string path, int fd)
      : path_(std::move(path)), fd_(fd) {}
  ~PosixWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }

  absl::Status Append(absl::string_view data) override {
    if (absl::Status open = CheckOpen("write"); !open.ok()) return open;
    const char* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      // Linux writes at most ~2 GiB per call; larger pieces loop.
      ssize_t n = ::write(fd_, p, std::min<size_t>(left, size_t(1) << 30));
      if (n < 0) {
        if (errno == EINTR) continue;
        return IoError("write", path_, errno);
      }
      p += n;
      left -= size_t(n);
    }
    return absl::OkStatus();
  }

  absl::Status Sync() override {
    if (absl::Status open = CheckOpen("fsync"); !open.ok()) return open;
    if (::fsync(fd_) != 0) return IoError("fsync", path_, errno);
    return absl::OkStatus();
  }

  absl::Status Close() override {
    if (absl::Status open = CheckOpen("close"); !open.ok()) return open;
    // The descriptor is gone even when close reports an error; retrying
    // could close a descriptor another thread just opened.
    if (::close(std::exchange(fd_, -1)) != 0)
      return IoError("close", path_, errno);
    return absl::OkStatus();
  }

  const std::string& path() const override { return path_; }

 private:
  absl::Status CheckOpen(absl::string_view operation) const {
    if (fd_ >= 0) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        operation, " of '", path_, "': the file is already closed"));
  }

  const std::string path_;
  int fd_;
};

class PosixEnv : public Env {
 public:
  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(
      const std::string& path) override {
    int fd =
        ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return IoError("create", path, errno);
    return std::unique_ptr<WritableFile>(new PosixWritableFile(path, fd));
  }

  absl::Status SyncFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return IoError("open", path, errno);
    const int result = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    if (result != 0) return IoError("fsync", path, err);
    return absl::OkStatus();
  }

  absl::Status RenameFile(const std::string& from,
                          const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return IoError(absl::StrCat("rename from '", from, "'"), to, errno);
    }
    return absl::OkStatus();
  }

  absl::Status RemoveFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return IoError("remove", path, errno);
    }
    return absl::OkStatus();
  }

  absl::Status CreateDirectories(const std::string& dir) override {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) return IoError("create directory", dir, error.value());
    if (!std::filesystem::is_directory(dir, error)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "create directory of '", dir, "': exists but is not a directory"));
    }
    return absl::OkStatus();
  }

  absl::Status SyncDirectory(const std::string& dir) override {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return IoError("open directory", dir, errno);
    const int result = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    if (result != 0) return IoError("fsync directory", dir, err);
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ReadFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return IoError("open", path, errno);
    std::string out;
    char buf[1 << 16];
    while (true) {
      ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        ::close(fd);
        return IoError("read", path, err);
      }
      if (n == 0) break;
      out.append(buf, size_t(n));
    }
    ::close(fd);
    return out;
  }

  absl::StatusOr<std::unique_ptr<MappedFile>> MapFile(
      const std::string& path) override {
    return MappedFile::Open(path);
  }

  absl::StatusOr<std::vector<std::string>> ListDirectory(
      const std::string& dir) override {
    std::error_code error;
    std::vector<std::string> names;
    for (std::filesystem::directory_iterator it(dir, error), end;
         !error && it != end; it.increment(error)) {
      names.push_back(it->path().filename().string());
    }
    if (error) return IoError("list directory", dir, error.value());
    std::sort(names.begin(), names.end());
    return names;
  }

  absl::StatusOr<bool> FileExists(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) return true;
    if (errno == ENOENT || errno == ENOTDIR) return false;
    return IoError("stat", path, errno);
  }

  absl::StatusOr<int64_t> GetFileSize(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return IoError("stat", path, errno);
    return int64_t(st.st_size);
  }
};

}  // namespace

Env* Env::Default() {
  // Stateless; leaked so that it outlives every static destructor.
  static Env* const env = new PosixEnv;
  return env;
}

}  // namespace retrace

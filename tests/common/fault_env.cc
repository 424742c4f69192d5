#include "tests/common/fault_env.h"

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status.h"

namespace retrace::testing {
namespace {

namespace fs = std::filesystem;

// One spelling per path, so that "d/x" and "d//x" are one file and a
// directory's changes are found by SyncDirectory("d/").
std::string Key(const std::string& path) {
  std::string key = fs::path(path).lexically_normal().string();
  while (key.size() > 1 && key.back() == '/') key.pop_back();
  return key;
}

std::string DirOf(const std::string& path) {
  const std::string parent = fs::path(Key(path)).parent_path().string();
  return parent.empty() ? "." : Key(parent);
}

absl::Status WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) {
    return absl::InternalError(
        absl::StrCat("fault env: cannot restore '", path, "'"));
  }
  return absl::OkStatus();
}

}  // namespace

// Forwards to the base file unless the FaultEnv decides otherwise. Must not
// outlive its FaultEnv.
class FaultWritableFile : public WritableFile {
 public:
  FaultWritableFile(FaultEnv* env, std::unique_ptr<WritableFile> base)
      : env_(env), base_(std::move(base)) {}

  absl::Status Append(absl::string_view data) override {
    const FaultEnv::Decision d = Decide(FaultEnv::Op::kWrite);
    if (d.outcome == FaultEnv::Outcome::kProceed) {
      absl::Status status = base_->Append(data);
      if (status.ok()) env_->RecordAppend(path(), int64_t(data.size()));
      return status;
    }
    if (d.outcome == FaultEnv::Outcome::kShortThenFail) {
      const absl::string_view half = data.substr(0, data.size() / 2);
      if (base_->Append(half).ok()) {
        env_->RecordAppend(path(), int64_t(half.size()));
      }
    }
    return IoError("write", path(), d.err);
  }

  absl::Status Sync() override {
    const FaultEnv::Decision d = Decide(FaultEnv::Op::kSync);
    if (d.outcome != FaultEnv::Outcome::kProceed) {
      return IoError("fsync", path(), d.err);
    }
    absl::Status status = base_->Sync();
    if (status.ok()) env_->RecordSync(path());
    return status;
  }

  absl::Status Close() override {
    const FaultEnv::Decision d = Decide(FaultEnv::Op::kClose);
    if (d.outcome != FaultEnv::Outcome::kProceed) {
      // As with close(2), the descriptor is released even on an error.
      base_->Close().IgnoreError();
      return IoError("close", path(), d.err);
    }
    return base_->Close();
  }

  const std::string& path() const override { return base_->path(); }

 private:
  FaultEnv::Decision Decide(FaultEnv::Op op) {
    std::lock_guard<std::mutex> lock(env_->mu_);
    return env_->Enter(op, path());
  }

  FaultEnv* const env_;
  const std::unique_ptr<WritableFile> base_;
};

const char* FaultEnv::OpName(Op op) {
  switch (op) {
    case Op::kCreate:
      return "create";
    case Op::kWrite:
      return "write";
    case Op::kSync:
      return "fsync";
    case Op::kClose:
      return "close";
    case Op::kRename:
      return "rename";
    case Op::kRemove:
      return "remove";
    case Op::kCreateDir:
      return "create directory";
    case Op::kSyncDir:
      return "fsync directory";
  }
  return "?";
}

FaultEnv::FaultEnv(Env* base) : base_(base) {}

void FaultEnv::FailNth(Op op, int64_t n, int err, bool short_write) {
  FailNthOn("", op, n, err, short_write);
}

void FaultEnv::FailNthOn(const std::string& path_part, Op op, int64_t n,
                         int err, bool short_write) {
  std::lock_guard<std::mutex> lock(mu_);
  fault_path_part_ = path_part;
  fault_matches_ = 0;
  fault_op_ = int(op);
  fault_n_ = n;
  fault_err_ = err;
  fault_short_ = short_write;
}

void FaultEnv::CrashAtWritePoint(int64_t point, bool torn_write) {
  std::lock_guard<std::mutex> lock(mu_);
  crash_point_ = point;
  torn_write_ = torn_write;
}

int64_t FaultEnv::write_points() const {
  std::lock_guard<std::mutex> lock(mu_);
  return write_points_;
}

int64_t FaultEnv::calls(Op op) const {
  std::lock_guard<std::mutex> lock(mu_);
  return calls_[size_t(op)];
}

bool FaultEnv::crashed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return crashed_;
}

FaultEnv::Decision FaultEnv::Enter(Op op, const std::string& path) {
  const int64_t point = write_points_++;
  ++calls_[size_t(op)];
  const bool may_tear = op == Op::kWrite;
  if (crashed_) return {Outcome::kFail, EIO};
  if (point == crash_point_) {
    crashed_ = true;
    return {may_tear && torn_write_ ? Outcome::kShortThenFail : Outcome::kFail,
            EIO};
  }
  if (int(op) == fault_op_ &&
      path.find(fault_path_part_) != std::string::npos &&
      fault_matches_++ == fault_n_) {
    return {may_tear && fault_short_ ? Outcome::kShortThenFail : Outcome::kFail,
            fault_err_};
  }
  return {Outcome::kProceed, 0};
}

std::pair<bool, std::string> FaultEnv::DurableContents(
    const std::string& path) {
  absl::StatusOr<std::string> contents = base_->ReadFile(path);
  if (!contents.ok()) return {false, std::string()};
  if (auto it = files_.find(Key(path)); it != files_.end()) {
    contents->resize(size_t(
        std::min<int64_t>(int64_t(contents->size()), it->second.synced)));
  }
  return {true, *std::move(contents)};
}

void FaultEnv::RecordAppend(const std::string& path, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  files_[Key(path)].size += bytes;
}

void FaultEnv::RecordSync(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = files_.find(Key(path)); it != files_.end()) {
    it->second.synced = it->second.size;
  }
}

absl::StatusOr<std::unique_ptr<WritableFile>> FaultEnv::NewWritableFile(
    const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kCreate, path);
  if (d.outcome != Outcome::kProceed) return IoError("create", path, d.err);
  const bool existed = base_->FileExists(path).value_or(false);
  absl::StatusOr<std::unique_ptr<WritableFile>> file =
      base_->NewWritableFile(path);
  if (!file.ok()) return file.status();
  files_[Key(path)] = FileState{};
  if (!existed) {
    dir_changes_[DirOf(path)].push_back(
        {DirChange::kCreated, Key(path), "", false, ""});
  }
  return std::unique_ptr<WritableFile>(
      new FaultWritableFile(this, *std::move(file)));
}

absl::Status FaultEnv::SyncFile(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kSync, path);
  if (d.outcome != Outcome::kProceed) return IoError("fsync", path, d.err);
  absl::Status status = base_->SyncFile(path);
  if (!status.ok()) return status;
  if (auto it = files_.find(Key(path)); it != files_.end()) {
    it->second.synced = it->second.size;
  }
  return absl::OkStatus();
}

absl::Status FaultEnv::RenameFile(const std::string& from,
                                  const std::string& to) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kRename, to);
  if (d.outcome != Outcome::kProceed) {
    return IoError(absl::StrCat("rename from '", from, "'"), to, d.err);
  }
  auto [had_old, old_contents] = DurableContents(to);
  RETURN_IF_ERROR(base_->RenameFile(from, to));
  files_.erase(Key(to));
  if (auto it = files_.find(Key(from)); it != files_.end()) {
    files_[Key(to)] = it->second;
    files_.erase(Key(from));
  }
  dir_changes_[DirOf(to)].push_back({DirChange::kRenamed, Key(to), Key(from),
                                     had_old, std::move(old_contents)});
  return absl::OkStatus();
}

absl::Status FaultEnv::RemoveFile(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kRemove, path);
  if (d.outcome != Outcome::kProceed) return IoError("remove", path, d.err);
  auto [existed, contents] = DurableContents(path);
  RETURN_IF_ERROR(base_->RemoveFile(path));
  if (!existed) return absl::OkStatus();
  files_.erase(Key(path));
  dir_changes_[DirOf(path)].push_back(
      {DirChange::kRemoved, Key(path), "", true, std::move(contents)});
  return absl::OkStatus();
}

absl::Status FaultEnv::CreateDirectories(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kCreateDir, dir);
  if (d.outcome != Outcome::kProceed) {
    return IoError("create directory", dir, d.err);
  }
  return base_->CreateDirectories(dir);
}

absl::Status FaultEnv::SyncDirectory(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  const Decision d = Enter(Op::kSyncDir, dir);
  if (d.outcome != Outcome::kProceed) {
    return IoError("fsync directory", dir, d.err);
  }
  RETURN_IF_ERROR(base_->SyncDirectory(dir));
  dir_changes_.erase(Key(dir));
  return absl::OkStatus();
}

absl::StatusOr<std::string> FaultEnv::ReadFile(const std::string& path) {
  return base_->ReadFile(path);
}

absl::StatusOr<std::unique_ptr<MappedFile>> FaultEnv::MapFile(
    const std::string& path) {
  return base_->MapFile(path);
}

absl::StatusOr<std::vector<std::string>> FaultEnv::ListDirectory(
    const std::string& dir) {
  return base_->ListDirectory(dir);
}

absl::StatusOr<bool> FaultEnv::FileExists(const std::string& path) {
  return base_->FileExists(path);
}

absl::StatusOr<int64_t> FaultEnv::GetFileSize(const std::string& path) {
  return base_->GetFileSize(path);
}

absl::Status FaultEnv::DropUnsyncedData() {
  std::lock_guard<std::mutex> lock(mu_);
  std::error_code error;
  for (const auto& [path, state] : files_) {
    if (!fs::exists(path, error)) continue;
    fs::resize_file(path, uintmax_t(state.synced), error);
    if (error) {
      return absl::InternalError(absl::StrCat("fault env: truncating '", path,
                                              "': ", error.message()));
    }
  }
  for (auto& [dir, changes] : dir_changes_) {
    for (auto it = changes.rbegin(); it != changes.rend(); ++it) {
      switch (it->kind) {
        case DirChange::kCreated:
          fs::remove(it->path, error);
          break;
        case DirChange::kRenamed:
          fs::rename(it->path, it->from, error);
          if (!error && it->had_old) {
            RETURN_IF_ERROR(WriteRaw(it->path, it->old_contents));
          }
          break;
        case DirChange::kRemoved:
          RETURN_IF_ERROR(WriteRaw(it->path, it->old_contents));
          break;
      }
      if (error) {
        return absl::InternalError(
            absl::StrCat("fault env: undoing a change of '", it->path,
                         "' in directory '", dir, "': ", error.message()));
      }
    }
  }
  files_.clear();
  dir_changes_.clear();
  write_points_ = 0;
  calls_.fill(0);
  crash_point_ = -1;
  torn_write_ = false;
  crashed_ = false;
  fault_op_ = -1;
  fault_n_ = -1;
  fault_path_part_.clear();
  fault_matches_ = 0;
  return absl::OkStatus();
}

}  // namespace retrace::testing

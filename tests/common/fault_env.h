// An Env for tests that wraps another (normally Env::Default()) and injects
// disk errors and simulated power losses, after LevelDB's
// FaultInjectionTestEnv.
//
//   FaultEnv env;
//   env.CrashAtWritePoint(7);           // the 8th disk-changing call fails,
//   EXPECT_FALSE(Build(dir, &env).ok());  // and so does everything after it
//   ASSERT_TRUE(env.DropUnsyncedData().ok());  // what the disk holds now
//   // ... resume with Env::Default() and compare with an uninterrupted run.
//
// Write points: every call that changes the disk (Op below) is one write
// point, numbered from 0 in call order. A dry run with no fault counts them
// (write_points()), so a test can crash at each one in turn.
//
// The crash model: data appended through this Env survives a crash only up
// to the file's last successful Sync (or SyncFile); the creation, rename or
// removal of a directory entry survives only once a later SyncDirectory of
// that directory succeeded. DropUnsyncedData truncates every file written
// here to its synced size and undoes, newest first, the unsynced directory
// changes. Files this Env did not write (e.g. written by LibTorch, then
// passed to SyncFile) keep their data; directories it creates are treated as
// durable.
//
// Thread-safe (one mutex); the state covers everything done through this
// object since construction or the last DropUnsyncedData.
#ifndef RETRACE_TESTS_COMMON_FAULT_ENV_H_
#define RETRACE_TESTS_COMMON_FAULT_ENV_H_

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/env.h"

namespace retrace::testing {

class FaultEnv : public Env {
 public:
  // The disk-changing operations, each a kind of write point.
  enum class Op {
    kCreate,     // NewWritableFile
    kWrite,      // WritableFile::Append
    kSync,       // WritableFile::Sync and Env::SyncFile
    kClose,      // WritableFile::Close
    kRename,     // RenameFile
    kRemove,     // RemoveFile
    kCreateDir,  // CreateDirectories
    kSyncDir,    // SyncDirectory
  };
  static constexpr int kNumOps = 8;
  // The operation as error messages name it ("fsync", "rename", ...).
  static const char* OpName(Op op);

  // `base` (not owned) does the real I/O.
  explicit FaultEnv(Env* base = Env::Default());

  // The call with 0-based index `n` among the calls of `op` fails with errno
  // `err` (EIO, ENOSPC, ...) and changes nothing, except that a failing
  // kWrite with `short_write` first writes the first half of its bytes. Later
  // calls succeed. One fault at a time: a second call replaces the first.
  void FailNth(Op op, int64_t n, int err, bool short_write = false);
  // As FailNth, counting only the calls of `op` whose path (a rename's
  // target) contains `path_part`, e.g. the second fsync of "train-state.pt".
  void FailNthOn(const std::string& path_part, Op op, int64_t n, int err,
                 bool short_write = false);

  // Simulated power loss at write point `point`: that call and every later
  // write point fail with EIO ("simulated crash") and change nothing (with
  // `torn_write`, a kWrite at `point` first writes half of its bytes).
  // Reads keep working, so that the caller can unwind.
  void CrashAtWritePoint(int64_t point, bool torn_write = false);

  // Write points reached so far (failed ones included).
  int64_t write_points() const;
  // Calls of `op` so far (failed ones included).
  int64_t calls(Op op) const;
  // Whether the crash set by CrashAtWritePoint has happened.
  bool crashed() const;

  // Leaves the disk as a power loss now would (see the crash model above)
  // and starts afresh: no crash, no fault, nothing tracked, counts at zero.
  absl::Status DropUnsyncedData();

  // Env.
  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(
      const std::string& path) override;
  absl::Status SyncFile(const std::string& path) override;
  absl::Status RenameFile(const std::string& from,
                          const std::string& to) override;
  absl::Status RemoveFile(const std::string& path) override;
  absl::Status CreateDirectories(const std::string& dir) override;
  absl::Status SyncDirectory(const std::string& dir) override;
  absl::StatusOr<std::string> ReadFile(const std::string& path) override;
  absl::StatusOr<std::unique_ptr<MappedFile>> MapFile(
      const std::string& path) override;
  absl::StatusOr<std::vector<std::string>> ListDirectory(
      const std::string& dir) override;
  absl::StatusOr<bool> FileExists(const std::string& path) override;
  absl::StatusOr<int64_t> GetFileSize(const std::string& path) override;

 private:
  friend class FaultWritableFile;

  // How a write point goes.
  enum class Outcome { kProceed, kFail, kShortThenFail };
  struct Decision {
    Outcome outcome = Outcome::kProceed;
    int err = 0;
  };
  // Size of a file written through this Env, and how much of it is durable.
  struct FileState {
    int64_t size = 0;
    int64_t synced = 0;
  };
  // A directory change not yet made durable by SyncDirectory.
  struct DirChange {
    enum Kind { kCreated, kRenamed, kRemoved } kind;
    std::string path;  // created, removed, or the rename's target
    std::string from;  // kRenamed: the source
    bool had_old = false;
    std::string old_contents;  // kRenamed: replaced target; kRemoved: file
  };

  // Counts a write point of `op` on `path` and decides its fate. Requires
  // mu_.
  Decision Enter(Op op, const std::string& path);
  // The durable part of `path`'s contents as they are now (for undoing a
  // removal or a replacing rename). Requires mu_.
  std::pair<bool, std::string> DurableContents(const std::string& path);
  void RecordAppend(const std::string& path, int64_t bytes);
  void RecordSync(const std::string& path);

  Env* const base_;
  mutable std::mutex mu_;
  int64_t write_points_ = 0;
  std::array<int64_t, kNumOps> calls_{};
  int64_t crash_point_ = -1;
  bool torn_write_ = false;
  bool crashed_ = false;
  int fault_op_ = -1;
  int64_t fault_n_ = -1;
  int fault_err_ = 0;
  bool fault_short_ = false;
  std::string fault_path_part_;  // empty: any path
  int64_t fault_matches_ = 0;    // calls that matched op and path so far
  std::map<std::string, FileState> files_;  // by current path
  std::map<std::string, std::vector<DirChange>> dir_changes_;  // by directory
};

}  // namespace retrace::testing

#endif  // RETRACE_TESTS_COMMON_FAULT_ENV_H_

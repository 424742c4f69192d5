// Env::Default against the file system seen through std::filesystem, and
// FaultEnv's crash model against the outcome written out by hand.
#include "common/env.h"

#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/file_util.h"
#include "tests/common/fault_env.h"

namespace retrace {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::ElementsAre;
using testing::FaultEnv;
using ::testing::HasSubstr;

std::string FreshDir() {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) / "retrace_env" /
                       (std::string(info->test_suite_name()) + "." +
                        info->name() + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void Write(Env* env, const std::string& path, const std::string& bytes,
           bool sync) {
  absl::StatusOr<std::unique_ptr<WritableFile>> file =
      env->NewWritableFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE((*file)->Append(bytes).ok());
  if (sync) ASSERT_TRUE((*file)->Sync().ok());
  ASSERT_TRUE((*file)->Close().ok());
}

TEST(DefaultEnvTest, FileOperations) {
  const std::string dir = FreshDir();
  Env* env = Env::Default();
  ASSERT_TRUE(env->CreateDirectories(dir + "/a/b").ok());
  EXPECT_TRUE(fs::is_directory(dir + "/a/b"));
  Write(env, dir + "/x.tmp", "hello", /*sync=*/true);
  EXPECT_EQ(*env->GetFileSize(dir + "/x.tmp"), 5);
  ASSERT_TRUE(env->RenameFile(dir + "/x.tmp", dir + "/x").ok());
  ASSERT_TRUE(env->SyncDirectory(dir).ok());
  EXPECT_EQ(*env->ReadFile(dir + "/x"), "hello");
  EXPECT_TRUE(*env->FileExists(dir + "/x"));
  EXPECT_FALSE(*env->FileExists(dir + "/x.tmp"));
  EXPECT_THAT(*env->ListDirectory(dir), ElementsAre("a", "x"));
  ASSERT_TRUE(env->SyncFile(dir + "/x").ok());
  absl::StatusOr<std::unique_ptr<MappedFile>> map = env->MapFile(dir + "/x");
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*map)->data()),
                        size_t((*map)->size())),
            "hello");
  ASSERT_TRUE(env->RemoveFile(dir + "/x").ok());
  EXPECT_FALSE(fs::exists(dir + "/x"));
  EXPECT_TRUE(env->RemoveFile(dir + "/x").ok());  // absent is fine
}

TEST(DefaultEnvTest, ErrorsNameOperationPathAndErrno) {
  const std::string dir = FreshDir();
  Env* env = Env::Default();
  absl::StatusOr<std::string> read = env->ReadFile(dir + "/missing");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(
      read.status().message(),
      AllOf(HasSubstr("open of '" + dir + "/missing'"), HasSubstr("(ENOENT)")));
  absl::Status renamed = env->RenameFile(dir + "/missing", dir + "/y");
  EXPECT_THAT(renamed.message(),
              HasSubstr("rename from '" + dir + "/missing' of '" + dir +
                        "/y': No such file or directory (ENOENT)"));
  Write(env, dir + "/file", "x", false);
  absl::Status mkdir = env->CreateDirectories(dir + "/file");
  EXPECT_FALSE(mkdir.ok());
  EXPECT_THAT(mkdir.message(), HasSubstr("create directory of '" + dir));

  EXPECT_EQ(IoError("fsync", "d/f", EIO).message(),
            "fsync of 'd/f': Input/output error (EIO)");
  EXPECT_EQ(IoError("write", "d/f", ENOSPC).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(IoError("write", "d/f", EIO).code(), absl::StatusCode::kInternal);
}

TEST(FaultEnvTest, PowerLossKeepsOnlySyncedDataAndSyncedDirectoryChanges) {
  const std::string dir = FreshDir();
  Write(Env::Default(), dir + "/old", "old contents", true);
  FaultEnv env;
  // Synced data and a synced creation survive; the unsynced tail does not.
  {
    absl::StatusOr<std::unique_ptr<WritableFile>> f =
        env.NewWritableFile(dir + "/durable");
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Append("kept").ok());
    ASSERT_TRUE((*f)->Sync().ok());
    ASSERT_TRUE((*f)->Append(" lost").ok());
    ASSERT_TRUE((*f)->Close().ok());
  }
  ASSERT_TRUE(env.SyncDirectory(dir).ok());
  // Created after the directory sync: gone, though its data was synced.
  Write(&env, dir + "/new", "synced", true);
  // A rename over an existing file, not followed by a directory sync: undone,
  // with the old target back.
  Write(&env, dir + "/old.tmp", "replacement", true);
  ASSERT_TRUE(env.RenameFile(dir + "/old.tmp", dir + "/old").ok());
  // An unsynced removal of a durable file: undone.
  ASSERT_TRUE(env.RemoveFile(dir + "/durable").ok());
  EXPECT_EQ(env.write_points(), 16);

  ASSERT_TRUE(env.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir + "/durable"), "kept");
  EXPECT_FALSE(fs::exists(dir + "/new"));
  EXPECT_EQ(Slurp(dir + "/old"), "old contents");
  EXPECT_FALSE(fs::exists(dir + "/old.tmp"));
  EXPECT_EQ(env.write_points(), 0);
}

TEST(FaultEnvTest, SyncedRenameSurvives) {
  const std::string dir = FreshDir();
  FaultEnv env;
  ASSERT_TRUE(WriteFileAtomically(&env, dir, "f", {"abc"}).ok());
  ASSERT_TRUE(env.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir + "/f"), "abc");
  EXPECT_FALSE(fs::exists(dir + "/f.tmp"));
}

TEST(FaultEnvTest, CrashFailsThatPointAndEveryLaterOne) {
  const std::string dir = FreshDir();
  FaultEnv env;
  ASSERT_TRUE(WriteFileAtomically(&env, dir, "f", {"abc"}).ok());
  // create, write, fsync, close, rename, fsync directory.
  ASSERT_EQ(env.write_points(), 6);
  for (int64_t point = 0; point < 6; ++point) {
    SCOPED_TRACE(point);
    ASSERT_TRUE(env.DropUnsyncedData().ok());
    fs::remove(dir + "/g");
    env.CrashAtWritePoint(point, /*torn_write=*/true);
    absl::Status status = WriteFileAtomically(&env, dir, "g", {"abc"});
    EXPECT_FALSE(status.ok());
    EXPECT_THAT(status.message(), HasSubstr("(EIO)"));
    EXPECT_TRUE(env.crashed());
    EXPECT_FALSE(env.RemoveFile(dir + "/f").ok());
    ASSERT_TRUE(env.DropUnsyncedData().ok());
    // Nothing of "g" is durable until the directory fsync, the last point.
    EXPECT_FALSE(fs::exists(dir + "/g"));
    EXPECT_EQ(Slurp(dir + "/f"), "abc");
  }
}

TEST(FaultEnvTest, FailNthFailsOneCallWithTheGivenErrno) {
  const std::string dir = FreshDir();
  FaultEnv env;
  env.FailNth(FaultEnv::Op::kWrite, 1, ENOSPC, /*short_write=*/true);
  absl::StatusOr<std::unique_ptr<WritableFile>> f =
      env.NewWritableFile(dir + "/f");
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE((*f)->Append("0123").ok());
  absl::Status failed = (*f)->Append("4567");
  EXPECT_EQ(failed.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(failed.message(), HasSubstr("write of '" + dir +
                                          "/f': No space left on device "
                                          "(ENOSPC)"));
  EXPECT_TRUE((*f)->Append("89").ok());
  EXPECT_TRUE((*f)->Close().ok());
  EXPECT_EQ(Slurp(dir + "/f"), "01234589");  // half of the failed write
  EXPECT_EQ(env.calls(FaultEnv::Op::kWrite), 3);
}

}  // namespace
}  // namespace retrace

// The store under disk faults: a power loss or a process crash at every write
// point of a build (whole, or in parts then joined), followed by a resume,
// gives the bytes of an uninterrupted build; an I/O error of each kind is
// reported naming the operation and the file, and leaves no store the reader
// accepts.
//
// The builds are small synthetic stores (store_test_data.h): 11 samples in
// shards of 4, so every kind of write point (three shards, the last one
// partial, and the manifest) occurs, and a build takes milliseconds.
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/file_util.h"
#include "common/status.h"
#include "server/store/store_parts.h"
#include "server/store/store_reader.h"
#include "tests/common/fault_env.h"
#include "tests/server/store/store_test_data.h"
#include "tests/server/store/store_test_util.h"

namespace retrace::store {
namespace {

using retrace::testing::FaultEnv;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int64_t kSamples = 11;
constexpr int64_t kSamplesPerShard = 4;
constexpr uint64_t kSeed = 7;
constexpr int64_t kParts = 2;
const nlohmann::json kDiagnostics = {{"spearman", {-0.5, 0.25}}};

StoreSpec Spec() {
  return testing::MakeSpec(kernels::DType::kF16, /*replay=*/true,
                           kSamplesPerShard);
}

// What a crash leaves behind: with a power loss, only what was made durable;
// with a process crash, everything the kernel already accepted.
enum class Crash { kPowerLoss, kProcess };

const char* CrashName(Crash crash) {
  return crash == Crash::kPowerLoss ? "power loss" : "process crash";
}

class StoreFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    reference_dir_ = testing::FreshDir("-reference");
    absl::StatusOr<Manifest> m =
        testing::BuildStore(reference_dir_, Spec(), kSamples, kSeed);
    ASSERT_TRUE(m.ok()) << m.status();
    reference_ = testing::DirContents(reference_dir_);
  }

  // Byte-for-byte equality with the uninterrupted build, naming the first
  // file that differs.
  void ExpectReferenceBytes(const std::string& dir) const {
    const std::map<std::string, std::string> actual = testing::DirContents(dir);
    std::vector<std::string> names, expected_names;
    for (const auto& [name, bytes] : actual) names.push_back(name);
    for (const auto& [name, bytes] : reference_) expected_names.push_back(name);
    EXPECT_EQ(names, expected_names);
    for (const auto& [name, bytes] : reference_) {
      auto it = actual.find(name);
      if (it != actual.end()) EXPECT_TRUE(it->second == bytes) << name;
    }
  }

  // A store the reader accepts as complete must not exist.
  static void ExpectNoStore(const std::string& dir) {
    absl::StatusOr<std::unique_ptr<StoreReader>> reader =
        StoreReader::Open(dir);
    EXPECT_FALSE(reader.ok()) << dir << " opens as a finished store";
  }

  // After a build of `dir` crashed at write point `point` of `points`: a
  // power loss drops what was not synced; then no store the reader accepts
  // exists (except after a process crash in the last directory fsync, when
  // the store is already finished), and a resume gives the reference bytes.
  void ExpectResumeAfterCrash(const std::string& dir, FaultEnv& env,
                              Crash crash, int64_t point,
                              int64_t points) const {
    if (crash == Crash::kPowerLoss) ASSERT_TRUE(env.DropUnsyncedData().ok());
    if (crash == Crash::kProcess && point == points - 1) {
      ASSERT_TRUE(StoreReader::Open(dir).ok());
      ExpectReferenceBytes(dir);
      return;
    }
    ExpectNoStore(dir);
    absl::StatusOr<Manifest> resumed =
        testing::BuildStore(dir, Spec(), kSamples, kSeed);
    ASSERT_TRUE(resumed.ok()) << resumed.status();
    ExpectReferenceBytes(dir);
  }

  std::string reference_dir_;
  std::map<std::string, std::string> reference_;
};

TEST_F(StoreFaultTest, CrashAtEveryWritePointThenResumeGivesTheSameBytes) {
  // The dry run counts the write points of an uninterrupted build.
  FaultEnv counter;
  {
    const std::string dir = testing::FreshDir("-dry");
    ASSERT_TRUE(
        testing::BuildStore(dir, Spec(), kSamples, kSeed, &counter).ok());
    ExpectReferenceBytes(dir);
  }
  const int64_t points = counter.write_points();
  // One directory creation, then for each shard and the manifest: create,
  // a write per piece (a shard's header and tensors), fsync, close, rename
  // and a directory fsync.
  EXPECT_EQ(counter.calls(FaultEnv::Op::kCreateDir), 1);
  EXPECT_EQ(counter.calls(FaultEnv::Op::kRename), 4);  // 3 shards + manifest
  EXPECT_EQ(counter.calls(FaultEnv::Op::kSyncDir), 4);
  std::printf("whole-store build: %lld write points\n",
              static_cast<long long>(points));

  const std::string dir = testing::FreshDir();
  for (Crash crash : {Crash::kPowerLoss, Crash::kProcess}) {
    for (bool torn : {false, true}) {
      for (int64_t point = 0; point < points; ++point) {
        SCOPED_TRACE(absl::StrCat(CrashName(crash), " at write point ", point,
                                  " of ", points, torn ? " (torn write)" : ""));
        std::filesystem::remove_all(dir);
        FaultEnv env;
        env.CrashAtWritePoint(point, torn);
        absl::StatusOr<Manifest> crashed =
            testing::BuildStore(dir, Spec(), kSamples, kSeed, &env);
        EXPECT_FALSE(crashed.ok());
        EXPECT_TRUE(env.crashed());
        ExpectResumeAfterCrash(dir, env, crash, point, points);
        if (HasFailure()) return;
      }
    }
  }
}

TEST_F(StoreFaultTest, CrashWhileResumingThenResumeAgain) {
  // A process crash with a torn write in the manifest leaves three shards
  // and a partial manifest.json.tmp; the resume removes the temporary and
  // the partial last shard (rewritten by Finish) and keeps the full shards.
  // Crash that resume at each of its write points too.
  const std::string dir = testing::FreshDir();
  auto crash_first_build = [&]() {
    std::filesystem::remove_all(dir);
    FaultEnv env;
    FaultEnv counter;
    ASSERT_TRUE(testing::BuildStore(testing::FreshDir("-dry"), Spec(), kSamples,
                                    kSeed, &counter)
                    .ok());
    // The manifest's write is the sixth point from the end.
    env.CrashAtWritePoint(counter.write_points() - 5, /*torn_write=*/true);
    ASSERT_FALSE(testing::BuildStore(dir, Spec(), kSamples, kSeed, &env).ok());
    ASSERT_TRUE(std::filesystem::exists(dir + "/manifest.json.tmp"));
  };
  crash_first_build();
  FaultEnv counter;
  ASSERT_TRUE(testing::BuildStore(dir, Spec(), kSamples, kSeed, &counter).ok());
  ExpectReferenceBytes(dir);
  const int64_t points = counter.write_points();
  EXPECT_EQ(counter.calls(FaultEnv::Op::kRemove), 2);
  std::printf("resume after a crash in the manifest: %lld write points\n",
              static_cast<long long>(points));
  for (Crash crash : {Crash::kPowerLoss, Crash::kProcess}) {
    for (int64_t point = 0; point < points; ++point) {
      SCOPED_TRACE(absl::StrCat(CrashName(crash), " at resume write point ",
                                point, " of ", points));
      crash_first_build();
      FaultEnv env;
      env.CrashAtWritePoint(point);
      EXPECT_FALSE(
          testing::BuildStore(dir, Spec(), kSamples, kSeed, &env).ok());
      ExpectResumeAfterCrash(dir, env, crash, point, points);
      if (HasFailure()) return;
    }
  }
}

// The substring an error of `op` on a file in `dir` must contain.
std::string OperationOn(FaultEnv::Op op, const std::string& dir) {
  if (op == FaultEnv::Op::kRename)
    return absl::StrCat("rename from '", dir, "/");
  if (op == FaultEnv::Op::kCreateDir || op == FaultEnv::Op::kSyncDir) {
    return absl::StrCat(FaultEnv::OpName(op), " of '", dir, "'");
  }
  return absl::StrCat(FaultEnv::OpName(op), " of '", dir, "/");
}

TEST_F(StoreFaultTest, IoErrorsAreReportedAndLeaveNoFinishedStore) {
  FaultEnv counter;
  ASSERT_TRUE(testing::BuildStore(testing::FreshDir("-dry"), Spec(), kSamples,
                                  kSeed, &counter)
                  .ok());
  const std::string dir = testing::FreshDir();
  int64_t cases = 0;
  for (int op_index = 0; op_index < FaultEnv::kNumOps; ++op_index) {
    const auto op = FaultEnv::Op(op_index);
    for (int64_t n = 0; n < counter.calls(op); ++n) {
      for (int err : {EIO, ENOSPC}) {
        for (bool short_write : {false, true}) {
          if (short_write && op != FaultEnv::Op::kWrite) continue;
          SCOPED_TRACE(absl::StrCat(FaultEnv::OpName(op), " call ", n,
                                    " fails ", strerrorname_np(err),
                                    short_write ? " after a short write" : ""));
          std::filesystem::remove_all(dir);
          FaultEnv env;
          env.FailNth(op, n, err, short_write);
          absl::StatusOr<Manifest> built =
              testing::BuildStore(dir, Spec(), kSamples, kSeed, &env);
          ASSERT_FALSE(built.ok());
          EXPECT_EQ(built.status().code(),
                    err == ENOSPC ? absl::StatusCode::kResourceExhausted
                                  : absl::StatusCode::kInternal);
          EXPECT_THAT(
              built.status().message(),
              AllOf(HasSubstr(OperationOn(op, dir)),
                    HasSubstr(absl::StrCat("(", strerrorname_np(err), ")"))));
          ExpectNoStore(dir);
          // The failed build resumes like a crashed one.
          ASSERT_TRUE(testing::BuildStore(dir, Spec(), kSamples, kSeed).ok());
          ExpectReferenceBytes(dir);
          ++cases;
          if (HasFailure()) return;
        }
      }
    }
  }
  std::printf("%lld injected I/O errors\n", static_cast<long long>(cases));
}

TEST_F(StoreFaultTest, IoErrorWhileResumingIsReported) {
  const std::string dir = testing::FreshDir();
  for (FaultEnv::Op op : {FaultEnv::Op::kRemove, FaultEnv::Op::kSyncDir}) {
    SCOPED_TRACE(FaultEnv::OpName(op));
    std::filesystem::remove_all(dir);
    {
      // A process crash in the manifest write leaves manifest.json.tmp.
      FaultEnv env;
      env.FailNth(FaultEnv::Op::kSync, 3, EIO);
      ASSERT_FALSE(
          testing::BuildStore(dir, Spec(), kSamples, kSeed, &env).ok());
      testing::WriteBytes(dir + "/manifest.json.tmp", "{\"partial");
    }
    FaultEnv env;
    env.FailNth(op, 0, EIO);
    absl::StatusOr<Manifest> resumed =
        testing::BuildStore(dir, Spec(), kSamples, kSeed, &env);
    ASSERT_FALSE(resumed.ok());
    EXPECT_THAT(resumed.status().message(),
                AllOf(HasSubstr(OperationOn(op, dir)), HasSubstr("(EIO)")));
    ExpectNoStore(dir);
    ASSERT_TRUE(testing::BuildStore(dir, Spec(), kSamples, kSeed).ok());
    ExpectReferenceBytes(dir);
  }
}

// Builds the store as kParts parts and joins them, each step resuming what
// an earlier, interrupted run left. A directory the reader already accepts
// is finished: the join refuses to run twice.
absl::Status BuildInParts(const std::string& dir, Env* env) {
  if (StoreReader::Open(dir).ok()) return absl::OkStatus();
  for (int64_t part = 0; part < kParts; ++part) {
    ASSIGN_OR_RETURN(
        std::unique_ptr<StorePartWriter> writer,
        StorePartWriter::Create(dir, Spec(), part, kParts, kSamples, env));
    testing::SampleData data;
    for (int64_t n = writer->next_sample(); n < writer->range().end_sample;
         ++n) {
      testing::FillSample(Spec(), kSeed, n, &data);
      RETURN_IF_ERROR(writer->Append(data.record));
    }
    RETURN_IF_ERROR(writer->Finish().status());
  }
  return JoinStoreParts(dir, Spec(), kDiagnostics, env).status();
}

TEST_F(StoreFaultTest, CrashAtEveryWritePointOfPartsAndJoin) {
  FaultEnv counter;
  {
    const std::string dir = testing::FreshDir("-dry");
    ASSERT_TRUE(BuildInParts(dir, &counter).ok());
    ExpectReferenceBytes(dir);  // the join equals a whole-store build
  }
  const int64_t points = counter.write_points();
  std::printf("build in %lld parts and join: %lld write points\n",
              static_cast<long long>(kParts), static_cast<long long>(points));
  const std::string dir = testing::FreshDir();
  for (Crash crash : {Crash::kPowerLoss, Crash::kProcess}) {
    for (int64_t point = 0; point < points; ++point) {
      SCOPED_TRACE(absl::StrCat(CrashName(crash), " at write point ", point,
                                " of ", points));
      std::filesystem::remove_all(dir);
      FaultEnv env;
      env.CrashAtWritePoint(point, /*torn_write=*/true);
      // The join only logs failures to tidy up after its manifest is durable.
      BuildInParts(dir, &env).IgnoreError();
      EXPECT_TRUE(env.crashed());
      if (crash == Crash::kPowerLoss) ASSERT_TRUE(env.DropUnsyncedData().ok());
      absl::Status resumed = BuildInParts(dir, Env::Default());
      ASSERT_TRUE(resumed.ok()) << resumed;
      // A crash after the join's manifest is durable leaves the parts'
      // records and locks, which readers ignore; everything else must match.
      std::map<std::string, std::string> actual = testing::DirContents(dir);
      for (auto it = actual.begin(); it != actual.end();) {
        int64_t i, n;
        it = ParsePartRecordFileName(it->first, &i, &n) ||
                     ParsePartLockFileName(it->first, &i, &n)
                 ? actual.erase(it)
                 : std::next(it);
      }
      EXPECT_TRUE(actual == reference_);
      if (HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace retrace::store

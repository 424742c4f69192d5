// `retrace-batch build-store` / `join-store` as a user runs them: killed with
// SIGKILL at pseudo-random moments and rerun, the store is byte-identical to
// an uninterrupted build; parts built by separate processes and joined equal
// it too; bad input exits 1 with a message.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "tests/jobs/tiny_run.h"

extern char** environ;

namespace retrace::jobs {
namespace {

using testing::ExpectSameDirectory;
using testing::FreshDir;
using testing::MakeTinyRun;
using testing::TinyRun;

// Starts retrace-batch with `args`, output appended to `log`.
pid_t Spawn(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv_storage = {RETRACE_BATCH_BINARY};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = -1;
  const int rc =
      posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  EXPECT_EQ(rc, 0) << "posix_spawn " << argv[0];
  return rc == 0 ? pid : -1;
}

// Exit code, or -signal when killed.
int Wait(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1000;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? -WTERMSIG(status) : -1000;
}

int RunToEnd(const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = Spawn(args, log);
  return pid > 0 ? Wait(pid) : -1000;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::vector<std::string> BuildArgs(const TinyRun& run, const std::string& out) {
  // Two samples per shard: 20 shards, so kills land between many of them.
  return {"build-store", "--run",
          run.run_dir,   "--out",
          out,           "--dim",
          "64",          "--sparsity",
          "2",           "--samples-per-shard",
          "2",           "--threads",
          "1",           "--batch",
          "4",           "--store-seed",
          "9",           "--progress-interval",
          "0.2"};
}

TEST(BuildStoreCliTest, KilledAtRandomMomentsAndRerunGivesTheSameBytes) {
  const TinyRun run = MakeTinyRun("kill");
  const std::string log = testing::TempPath("kill.log");
  std::filesystem::remove(log);

  const std::string reference = FreshDir("kill-reference");
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(RunToEnd(BuildArgs(run, reference), log), 0) << Slurp(log);
  const double full_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();

  const uint32_t seed = 20240611;
  std::printf("uninterrupted build %.2f s; kill delays seeded with %u\n",
              full_seconds, seed);
  std::mt19937 rng(seed);
  // Each rerun resumes and so has less left to do: delays up to a third of
  // the full build land in start-up, mid-shard and between shards, and leave
  // several kills before a run gets through.
  std::uniform_real_distribution<double> fraction(0.05, 0.35);
  const std::string out = FreshDir("kill-store");
  int kills = 0;
  for (int attempt = 0; attempt < 5; ++attempt) {
    const double delay = fraction(rng) * full_seconds;
    SCOPED_TRACE(::testing::Message()
                 << "attempt " << attempt << " delay " << delay << " s");
    const pid_t pid = Spawn(BuildArgs(run, out), log);
    ASSERT_GT(pid, 0);
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    const int code = Wait(pid);
    if (code == -SIGKILL && std::filesystem::exists(out + "/manifest.json")) {
      // Killed between writing the manifest and exiting. A manifest means
      // "complete": the byte comparison below holds it to that.
      break;
    }
    if (code == -SIGKILL) {
      ++kills;
      // A kill during start-up can land before the output directory exists.
      int64_t shards = 0;
      std::error_code missing;
      for (const auto& entry :
           std::filesystem::directory_iterator(out, missing)) {
        shards += entry.path().extension() == ".safetensors";
      }
      std::printf("killed after %.2f s with %lld shards on disk\n", delay,
                  static_cast<long long>(shards));
    } else {
      // It finished first (the kill came after exit): nothing left to do.
      ASSERT_EQ(code, 0) << Slurp(log);
      break;
    }
  }
  EXPECT_GE(kills, 2);
  if (!std::filesystem::exists(out + "/manifest.json")) {
    ASSERT_EQ(RunToEnd(BuildArgs(run, out), log), 0) << Slurp(log);
  }
  ExpectSameDirectory(reference, out);
  const std::string output = Slurp(log);
  EXPECT_NE(output.find("samples/s"), std::string::npos) << output;
  EXPECT_NE(output.find("ETA"), std::string::npos) << output;
}

TEST(BuildStoreCliTest, PartsInSeparateProcessesJoinToTheSingleBuild) {
  const TinyRun run = MakeTinyRun("cli-parts");
  const std::string log = testing::TempPath("cli-parts.log");
  std::filesystem::remove(log);
  const std::string single = FreshDir("cli-parts-single");
  ASSERT_EQ(RunToEnd(BuildArgs(run, single), log), 0) << Slurp(log);
  const std::string parts = FreshDir("cli-parts-joined");
  std::vector<pid_t> pids;
  for (const char* shard : {"0/3", "1/3", "2/3"}) {
    std::vector<std::string> args = BuildArgs(run, parts);
    args.push_back("--shard");
    args.push_back(shard);
    pids.push_back(Spawn(args, log));  // side by side in one directory
  }
  for (pid_t pid : pids) ASSERT_EQ(Wait(pid), 0) << Slurp(log);
  EXPECT_FALSE(std::filesystem::exists(parts + "/manifest.json"));
  ASSERT_EQ(RunToEnd({"join-store", "--out", parts}, log), 0) << Slurp(log);
  ExpectSameDirectory(single, parts);
}

TEST(BuildStoreCliTest, BadInputExitsOneWithAMessage) {
  const TinyRun run = MakeTinyRun("cli-bad");
  const std::string log = testing::TempPath("cli-bad.log");
  // A dataset other than the run's.
  std::filesystem::remove(log);
  std::vector<std::string> args = BuildArgs(run, FreshDir("cli-bad-store"));
  args.push_back("--dataset");
  args.push_back("folder:path=" + run.data_root + ":limit=30");
  EXPECT_EQ(RunToEnd(args, log), 1);
  EXPECT_NE(Slurp(log).find("does not match"), std::string::npos) << Slurp(log);
  // Usage errors exit 2.
  std::filesystem::remove(log);
  args = BuildArgs(run, FreshDir("cli-bad-store2"));
  args.push_back("--shard");
  args.push_back("3/3");
  EXPECT_EQ(RunToEnd(args, log), 2) << Slurp(log);
  // Joining a directory without parts.
  std::filesystem::remove(log);
  EXPECT_EQ(RunToEnd({"join-store", "--out", FreshDir("cli-bad-none")}, log),
            1);
  EXPECT_NE(Slurp(log).find("build-spec.json"), std::string::npos)
      << Slurp(log);
}

}  // namespace
}  // namespace retrace::jobs

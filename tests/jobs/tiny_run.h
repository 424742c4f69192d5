// Test helpers for the store build: a folder of synthetic 28×28 PNGs that the
// mixture loader (and so the retrace-batch binary) reads as
// "folder:path=<root>", a tiny training run on it, and byte comparison of
// directories.
#ifndef RETRACE_TESTS_JOBS_TINY_RUN_H_
#define RETRACE_TESTS_JOBS_TINY_RUN_H_

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "jobs/train.h"
#include "server/data/mixture.h"

namespace retrace::jobs::testing {

namespace fs = std::filesystem;

inline constexpr int64_t kTinyImages = 40;  // 2 classes × 20
inline constexpr uint64_t kTinyRunSeed = 7;
inline constexpr int kTinyThreads = 1;

inline std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/retrace-build-store-" + name + "-" +
         std::to_string(::getpid());
}

inline std::string FreshDir(const std::string& name) {
  const std::string dir = TempPath(name);
  fs::remove_all(dir);
  return dir;
}

// root/<class a|b>/<i>.png: smooth patterns that differ per image.
inline void WriteImageFolder(const std::string& root) {
  for (int64_t n = 0; n < kTinyImages; ++n) {
    const std::string cls = n % 2 == 0 ? "a" : "b";
    fs::create_directories(root + "/" + cls);
    std::vector<uint8_t> pixels(28 * 28);
    for (int y = 0; y < 28; ++y) {
      for (int x = 0; x < 28; ++x) {
        const double v =
            std::sin(0.3 * x + 0.7 * n) * std::cos(0.2 * y - 0.1 * n);
        pixels[y * 28 + x] = static_cast<uint8_t>(std::lround(127.5 * (v + 1)));
      }
    }
    char name[32];
    std::snprintf(name, sizeof(name), "/%03d.png", static_cast<int>(n));
    ASSERT_NE(stbi_write_png((root + "/" + cls + name).c_str(), 28, 28, 1,
                             pixels.data(), 28),
              0);
  }
}

inline data::MixtureSpec TinySpec(const std::string& root) {
  auto spec = data::ParseMixtureSpec("folder:path=" + root);
  EXPECT_TRUE(spec.ok()) << spec.status();
  spec->seed = 3;
  return *spec;
}

inline TrainConfig TinyTrainConfig(const data::MixtureSpec& spec) {
  TrainConfig config;
  config.dataset_spec = data::FormatMixtureSpec(spec);
  config.dataset_seed = spec.seed;
  config.model.base_channels = 4;
  config.model.channel_mults = {1, 2};
  config.model.attention = false;
  config.model.norm_groups = 2;
  config.batch_size = 8;
  config.steps = 10;
  config.checkpoint_every = 4;  // checkpoints 4, 8, 10; 8 samples unseen at 4
  config.run_seed = kTinyRunSeed;
  return config;
}

struct TinyRun {
  std::string data_root;
  std::string run_dir;
  data::MixtureSpec spec;
  data::Mixture mixture;
};

// Writes the image folder and trains the tiny run under `name`.
inline TinyRun MakeTinyRun(const std::string& name) {
  TinyRun run;
  run.data_root = FreshDir(name + "-data");
  run.run_dir = FreshDir(name + "-run");
  WriteImageFolder(run.data_root);
  run.spec = TinySpec(run.data_root);
  auto mixture = data::BuildMixture(run.spec);
  EXPECT_TRUE(mixture.ok()) << mixture.status();
  if (!mixture.ok()) return run;
  run.mixture = *std::move(mixture);
  TrainOptions options;
  options.run_dir = run.run_dir;
  options.threads = kTinyThreads;
  auto trained = Train(TinyTrainConfig(run.spec), run.mixture.images,
                       run.mixture.sample_ids, options);
  EXPECT_TRUE(trained.ok()) << trained.status();
  return run;
}

// name -> bytes of every regular file directly in `dir`.
inline std::map<std::string, std::string> DirectoryBytes(
    const std::string& dir) {
  std::map<std::string, std::string> files;
  if (!fs::exists(dir)) return files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    files[entry.path().filename().string()] = bytes.str();
  }
  return files;
}

// Same file names and bytes; reports the first differences.
inline void ExpectSameDirectory(const std::string& expected,
                                const std::string& actual) {
  const auto a = DirectoryBytes(expected);
  const auto b = DirectoryBytes(actual);
  std::vector<std::string> names_a, names_b;
  for (const auto& [name, bytes] : a) names_a.push_back(name);
  for (const auto& [name, bytes] : b) names_b.push_back(name);
  ASSERT_EQ(names_a, names_b) << expected << " vs " << actual;
  ASSERT_FALSE(a.empty());
  for (const auto& [name, bytes] : a) {
    EXPECT_TRUE(bytes == b.at(name)) << name << " differs";
  }
}

}  // namespace retrace::jobs::testing

#endif  // RETRACE_TESTS_JOBS_TINY_RUN_H_

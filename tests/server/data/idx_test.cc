#include "server/data/idx.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "tests/server/data/test_files.h"

namespace retrace::data {
namespace {

using testing_files::FreshDir;
using testing_files::IdxBytes;
using testing_files::WriteBytes;

TEST(IdxTest, ReadsPlainAndGzipped) {
  const std::string dir = FreshDir("idx");
  const std::vector<uint8_t> data = {0,  1,  2,  127, 128, 255,
                                     10, 20, 30, 40,  50,  60};
  for (bool gzip : {false, true}) {
    SCOPED_TRACE(testing::Message() << "gzip=" << gzip);
    const std::string path = dir + (gzip ? "/a.idx.gz" : "/a.idx");
    WriteBytes(path, IdxBytes({3, 2, 2}, data), gzip);
    auto array = ReadIdxFile(path);
    ASSERT_TRUE(array.ok()) << array.status();
    EXPECT_EQ(array->dims, (std::vector<int64_t>{3, 2, 2}));
    EXPECT_EQ(array->data, data);
  }
}

TEST(IdxTest, ImageSetPixelsAndLabels) {
  const std::string dir = FreshDir("set");
  // Two 2x3 images.
  WriteBytes(dir + "/images", IdxBytes({2, 2, 3}, {0, 51, 102, 153, 204, 255,
                                                   255, 0, 255, 0, 255, 0}));
  WriteBytes(dir + "/labels", IdxBytes({2}, {7, 3}), /*gzip=*/true);
  auto set = ReadIdxImageSet(dir + "/images", dir + "/labels", "toy");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->name, "toy");
  EXPECT_EQ(set->size(), 2);
  EXPECT_EQ(set->height, 2);
  EXPECT_EQ(set->width, 3);
  EXPECT_EQ(set->labels, (std::vector<int32_t>{7, 3}));
  // b / 127.5 - 1, by hand.
  const std::vector<float> first = {-1.0f, -0.6f, -0.2f, 0.2f, 0.6f, 1.0f};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(set->Image(0)[i], first[i], 1e-6);
  EXPECT_FLOAT_EQ(set->Image(1)[0], 1.0f);
  EXPECT_FLOAT_EQ(set->Image(1)[1], -1.0f);
}

TEST(IdxTest, Errors) {
  const std::string dir = FreshDir("errors");
  struct Case {
    const char* name;
    std::vector<uint8_t> bytes;
    absl::StatusCode code;
    const char* message_part;
  };
  std::vector<uint8_t> truncated = IdxBytes({2, 2, 2}, {1, 2, 3});
  std::vector<uint8_t> trailing = IdxBytes({2}, {1, 2, 3});
  std::vector<uint8_t> bad_magic = IdxBytes({2}, {1, 2});
  bad_magic[0] = 1;
  std::vector<uint8_t> bad_type = IdxBytes({2}, {1, 2});
  bad_type[2] = 0x0D;  // float
  const Case cases[] = {
      {"truncated", truncated, absl::StatusCode::kDataLoss, "truncated"},
      {"trailing", trailing, absl::StatusCode::kDataLoss, "after"},
      {"bad_magic", bad_magic, absl::StatusCode::kDataLoss, "magic"},
      {"bad_type", bad_type, absl::StatusCode::kDataLoss, "0x08"},
      {"empty", {}, absl::StatusCode::kDataLoss, "header"},
      // A gzip header followed by garbage.
      {"corrupt_gzip",
       {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef},
       absl::StatusCode::kDataLoss,
       ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/" + c.name;
    WriteBytes(path, c.bytes);
    auto array = ReadIdxFile(path);
    EXPECT_EQ(array.status().code(), c.code) << array.status();
    EXPECT_NE(array.status().message().find(path), std::string::npos)
        << array.status();
    EXPECT_NE(array.status().message().find(c.message_part), std::string::npos)
        << array.status();
  }
  auto missing = ReadIdxFile(dir + "/nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(dir + "/nope"), std::string::npos);

  WriteBytes(dir + "/images", IdxBytes({2, 1, 1}, {1, 2}));
  WriteBytes(dir + "/labels3", IdxBytes({3}, {0, 1, 2}));
  auto mismatch = ReadIdxImageSet(dir + "/images", dir + "/labels3", "x");
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(mismatch.status().message().find("3 labels"), std::string::npos)
      << mismatch.status();
  auto wrong_rank = ReadIdxImageSet(dir + "/labels3", dir + "/labels3", "x");
  EXPECT_EQ(wrong_rank.status().code(), absl::StatusCode::kDataLoss);
}

TEST(FashionMnistTest, LoadsSyntheticSplitFiles) {
  const std::string dir = FreshDir("fmnist");
  std::vector<uint8_t> pixels(4 * 28 * 28);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = i % 256;
  WriteBytes(dir + "/t10k-images-idx3-ubyte.gz", IdxBytes({4, 28, 28}, pixels),
             true);
  WriteBytes(dir + "/t10k-labels-idx1-ubyte", IdxBytes({4}, {9, 0, 0, 2}));
  auto set = LoadFashionMnist(dir, Split::kTest);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->name, "fashion-mnist/test");
  EXPECT_EQ(set->size(), 4);
  EXPECT_EQ(set->class_names.size(), 10u);
  EXPECT_EQ(set->labels[0], 9);

  auto train = LoadFashionMnist(dir, Split::kTrain);
  EXPECT_EQ(train.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(train.status().message().find("train-images-idx3-ubyte"),
            std::string::npos);

  WriteBytes(dir + "/t10k-labels-idx1-ubyte", IdxBytes({4}, {9, 0, 10, 2}));
  EXPECT_EQ(LoadFashionMnist(dir, Split::kTest).status().code(),
            absl::StatusCode::kDataLoss);
}

// Reads the real files from Debian's dataset-fashion-mnist when installed.
TEST(FashionMnistTest, DebianPackageFiles) {
  const std::string dir = kDebianFashionMnistDir;
  if (!std::filesystem::exists(dir + "/train-images-idx3-ubyte.gz") &&
      !std::filesystem::exists(dir + "/train-images-idx3-ubyte")) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed (" << dir << ")";
  }
  for (Split split : {Split::kTrain, Split::kTest}) {
    SCOPED_TRACE(SplitName(split));
    auto set = LoadFashionMnist(dir, split);
    ASSERT_TRUE(set.ok()) << set.status();
    const int64_t expected = split == Split::kTrain ? 60000 : 10000;
    EXPECT_EQ(set->size(), expected);
    EXPECT_EQ(set->height, 28);
    EXPECT_EQ(set->width, 28);
    std::vector<int64_t> per_class(10, 0);
    for (int32_t label : set->labels) ++per_class[label];
    for (int64_t count : per_class) EXPECT_EQ(count, expected / 10);
    float lo = 1, hi = -1;
    for (float v : set->pixels) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    EXPECT_EQ(lo, -1.0f);
    EXPECT_EQ(hi, 1.0f);
  }
}

}  // namespace
}  // namespace retrace::data

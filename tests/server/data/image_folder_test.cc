#include "server/data/image_folder.h"

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>

#include <filesystem>
#include <fstream>

#include "tests/server/data/test_files.h"

namespace retrace::data {
namespace {

using testing_files::FreshDir;

// The built-in model's shape.
constexpr ImageSpec kGray28 = {1, 28, 28};

// Writes a w×h PNG with `channels` channels; pixel (x, y), channel c holds
// (seed + 7x + 13y + 50c) mod 256.
std::vector<uint8_t> WritePng(const std::string& path, int w, int h,
                              int channels, int seed) {
  std::vector<uint8_t> bytes(w * h * channels);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      for (int c = 0; c < channels; ++c) {
        bytes[(y * w + x) * channels + c] =
            (seed + 7 * x + 13 * y + 50 * c) % 256;
      }
    }
  }
  EXPECT_NE(
      stbi_write_png(path.c_str(), w, h, channels, bytes.data(), w * channels),
      0)
      << path;
  return bytes;
}

TEST(ImageFolderTest, ClassesFromSubFolders) {
  const std::string root = FreshDir("tree");
  std::filesystem::create_directories(root + "/dog");
  std::filesystem::create_directories(root + "/cat");
  std::filesystem::create_directories(root + "/.hidden");
  auto cat_b = WritePng(root + "/cat/b.png", 28, 28, 1, 1);
  auto cat_a = WritePng(root + "/cat/a.PNG", 28, 28, 1, 2);
  auto dog = WritePng(root + "/dog/z.png", 28, 28, 1, 3);
  WritePng(root + "/.hidden/x.png", 5, 5, 3, 0);
  std::ofstream(root + "/dog/notes.txt") << "not an image";

  auto set = LoadImageFolder(root, kGray28);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->name, "folder:" + root);
  EXPECT_EQ(set->class_names, (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(set->labels, (std::vector<int32_t>{0, 0, 1}));
  ASSERT_EQ(set->paths.size(), 3u);
  EXPECT_EQ(set->paths[0], root + "/cat/a.PNG");
  EXPECT_EQ(set->paths[2], root + "/dog/z.png");
  for (int i = 0; i < 784; ++i) {
    ASSERT_FLOAT_EQ(set->Image(0)[i], cat_a[i] / 127.5f - 1) << i;
    ASSERT_FLOAT_EQ(set->Image(1)[i], cat_b[i] / 127.5f - 1) << i;
    ASSERT_FLOAT_EQ(set->Image(2)[i], dog[i] / 127.5f - 1) << i;
  }
}

TEST(ImageFolderTest, RgbIsChannelMajor) {
  const std::string dir = FreshDir("rgb");
  auto bytes = WritePng(dir + "/rgb.png", 4, 3, 3, 9);
  std::ifstream in(dir + "/rgb.png", std::ios::binary);
  std::string png((std::istreambuf_iterator<char>(in)),
                  std::istreambuf_iterator<char>());
  auto pixels = DecodeImage(png, ImageSpec{3, 3, 4}, "rgb.png");
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  ASSERT_EQ(pixels->size(), 36u);
  for (int p = 0; p < 12; ++p) {
    for (int c = 0; c < 3; ++c) {
      EXPECT_FLOAT_EQ((*pixels)[c * 12 + p], bytes[p * 3 + c] / 127.5f - 1);
    }
  }
}

TEST(ImageFolderTest, WrongSizeOrColourNamesFileAndExpectation) {
  const std::string root = FreshDir("wrong");
  std::filesystem::create_directories(root + "/a");
  WritePng(root + "/a/ok.png", 28, 28, 1, 0);
  WritePng(root + "/a/small.png", 27, 28, 1, 0);
  auto set = LoadImageFolder(root, kGray28);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(set.status().message().find(root + "/a/small.png"),
            std::string::npos)
      << set.status();
  // 27 wide, 28 high.
  EXPECT_NE(set.status().message().find(
                "is 28x27 (height x width) with 1 channel (gray); the model "
                "takes 1x28x28"),
            std::string::npos)
      << set.status();

  std::filesystem::remove(root + "/a/small.png");
  // Channel c holds 50c more than channel 0: a colour image.
  WritePng(root + "/a/rgb.png", 28, 28, 3, 0);
  set = LoadImageFolder(root, kGray28);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(set.status().message().find("rgb.png"), std::string::npos);
  EXPECT_NE(set.status().message().find("colour image"), std::string::npos)
      << set.status();
}

TEST(ImageFolderTest, CorruptMissingAndEmpty) {
  const std::string root = FreshDir("corrupt");
  std::filesystem::create_directories(root + "/a");
  std::ofstream(root + "/a/bad.jpg") << "definitely not a jpeg";
  auto set = LoadImageFolder(root, kGray28);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(set.status().message().find(root + "/a/bad.jpg"), std::string::npos)
      << set.status();
  EXPECT_NE(set.status().message().find("not a PNG or JPEG file"),
            std::string::npos);

  EXPECT_EQ(LoadImageFolder(root + "/missing", kGray28).status().code(),
            absl::StatusCode::kNotFound);
  const std::string empty = FreshDir("empty");
  EXPECT_EQ(LoadImageFolder(empty, kGray28).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::filesystem::create_directories(empty + "/only_text");
  std::ofstream(empty + "/only_text/readme.md") << "x";
  EXPECT_EQ(LoadImageFolder(empty, kGray28).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeImage("", kGray28, "empty").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::data

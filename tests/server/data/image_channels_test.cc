// Images of any model shape (gray or RGB, up to 256x256): files written here
// with stb_image_write, read back through DecodeImage / LoadImageFolder /
// BuildMixture, and compared with the bytes written, mapped to [-1, 1] in
// double precision (b / 127.5 - 1) and laid out channel-major by hand.
#include <gtest/gtest.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "server/data/image_folder.h"
#include "server/data/mixture.h"
#include "tests/server/data/test_files.h"

namespace retrace::data {
namespace {

using testing_files::FreshDir;

// float32 b/127.5 - 1 against the double value.
constexpr double kPixelTolerance = 1e-6;

// An interleaved [H, W, C] 8-bit image as a file format stores it.
struct Bytes {
  int width = 0;
  int height = 0;
  int channels = 0;
  std::vector<uint8_t> data;

  uint8_t At(int x, int y, int c) const {
    return data[(static_cast<size_t>(y) * width + x) * channels + c];
  }
};

// Pixel (x, y), channel c: (seed + 7x + 13y + 50c) mod 256, so channels
// differ (a colour image when there are three).
Bytes Pattern(int width, int height, int channels, int seed) {
  Bytes b{width, height, channels, {}};
  b.data.resize(static_cast<size_t>(width) * height * channels);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        b.data[(static_cast<size_t>(y) * width + x) * channels + c] =
            static_cast<uint8_t>((seed + 7 * x + 13 * y + 50 * c) % 256);
      }
    }
  }
  return b;
}

void WritePng(const std::string& path, const Bytes& b) {
  ASSERT_NE(stbi_write_png(path.c_str(), b.width, b.height, b.channels,
                           b.data.data(), b.width * b.channels),
            0)
      << path;
}

std::string PngBytes(const Bytes& b) {
  std::string png;
  EXPECT_NE(stbi_write_png_to_func(
                [](void* context, void* data, int size) {
                  static_cast<std::string*>(context)->append(
                      static_cast<const char*>(data), size);
                },
                &png, b.width, b.height, b.channels, b.data.data(),
                b.width * b.channels),
            0);
  return png;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

double Expected(uint8_t byte) { return byte / 127.5 - 1.0; }

// Checks a [C, H, W] float image against file bytes: model channel c comes
// from file channel source(c).
// `levels`: how many 8-bit levels a value may be off (0: exact).
template <typename Source>
void ExpectPixels(absl::Span<const float> got, const Bytes& file,
                  int model_channels, Source source, int levels = 0) {
  const size_t plane = static_cast<size_t>(file.width) * file.height;
  ASSERT_EQ(got.size(), plane * model_channels);
  for (int c = 0; c < model_channels; ++c) {
    for (int y = 0; y < file.height; ++y) {
      for (int x = 0; x < file.width; ++x) {
        const size_t at = c * plane + static_cast<size_t>(y) * file.width + x;
        ASSERT_NEAR(got[at], Expected(file.At(x, y, source(c))),
                    kPixelTolerance + levels / 127.5)
            << "channel " << c << " x " << x << " y " << y;
      }
    }
  }
}

TEST(ImageChannelsTest, RgbFolderLoadsChannelMajor) {
  // Not square, so that a swapped height and width shows.
  constexpr int kWidth = 20, kHeight = 12;
  const ImageSpec spec{3, kHeight, kWidth};
  const std::string root = FreshDir("rgb");
  std::filesystem::create_directories(root + "/circle");
  std::filesystem::create_directories(root + "/square");
  const Bytes a = Pattern(kWidth, kHeight, 3, 1);
  const Bytes b = Pattern(kWidth, kHeight, 3, 90);
  const Bytes c = Pattern(kWidth, kHeight, 3, 200);
  WritePng(root + "/square/0.png", c);
  WritePng(root + "/circle/1.png", b);
  WritePng(root + "/circle/0.png", a);

  absl::StatusOr<ImageSet> set = LoadImageFolder(root, spec);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->channels, 3);
  EXPECT_EQ(set->height, kHeight);
  EXPECT_EQ(set->width, kWidth);
  EXPECT_EQ(set->labels, (std::vector<int32_t>{0, 0, 1}));
  EXPECT_EQ(set->class_names, (std::vector<std::string>{"circle", "square"}));
  const auto same = [](int channel) { return channel; };
  ExpectPixels(set->Image(0), a, 3, same);
  ExpectPixels(set->Image(1), b, 3, same);
  ExpectPixels(set->Image(2), c, 3, same);
}

TEST(ImageChannelsTest, GrayAndAlphaFilesInAnRgbFolder) {
  constexpr int kSide = 16;
  const ImageSpec spec{3, kSide, kSide};
  const std::string root = FreshDir("mixed");
  std::filesystem::create_directories(root + "/x");
  const Bytes gray = Pattern(kSide, kSide, 1, 5);
  const Bytes gray_alpha = Pattern(kSide, kSide, 2, 17);
  const Bytes rgba = Pattern(kSide, kSide, 4, 33);
  WritePng(root + "/x/0-gray.png", gray);
  WritePng(root + "/x/1-gray-alpha.png", gray_alpha);
  WritePng(root + "/x/2-rgba.png", rgba);

  absl::StatusOr<ImageSet> set = LoadImageFolder(root, spec);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->size(), 3);
  {
    SCOPED_TRACE("gray: replicated into R, G and B");
    ExpectPixels(set->Image(0), gray, 3, [](int) { return 0; });
  }
  {
    SCOPED_TRACE("gray + alpha: alpha dropped, gray replicated");
    ExpectPixels(set->Image(1), gray_alpha, 3, [](int) { return 0; });
  }
  {
    SCOPED_TRACE("RGBA: alpha dropped");
    ExpectPixels(set->Image(2), rgba, 3, [](int c) { return c; });
  }
}

TEST(ImageChannelsTest, GrayModelTakesGrayLookingRgbAndRefusesColour) {
  constexpr int kWidth = 9, kHeight = 7;
  const ImageSpec spec{1, kHeight, kWidth};
  // R = G = B at every pixel: what many tools write for a gray picture.
  Bytes gray_rgb = Pattern(kWidth, kHeight, 1, 40);
  Bytes rgb{kWidth, kHeight, 3, {}};
  for (uint8_t v : gray_rgb.data) rgb.data.insert(rgb.data.end(), {v, v, v});
  absl::StatusOr<std::vector<float>> pixels =
      DecodeImage(PngBytes(rgb), spec, "gray.png");
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  ExpectPixels(*pixels, gray_rgb, 1, [](int) { return 0; });

  // The same with alpha.
  Bytes rgba{kWidth, kHeight, 4, {}};
  for (uint8_t v : gray_rgb.data)
    rgba.data.insert(rgba.data.end(), {v, v, v, 7});
  pixels = DecodeImage(PngBytes(rgba), spec, "gray-alpha.png");
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  ExpectPixels(*pixels, gray_rgb, 1, [](int) { return 0; });

  // One pixel off gray (row 5, column 3) makes it a colour image.
  rgb.data[(5 * kWidth + 3) * 3 + 2] ^= 1;
  pixels = DecodeImage(PngBytes(rgb), spec, "colour.png");
  EXPECT_EQ(pixels.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(pixels.status().message(),
                                "colour.png is a colour image"))
      << pixels.status();
  EXPECT_TRUE(absl::StrContains(pixels.status().message(), "row 5, column 3"))
      << pixels.status();
  EXPECT_TRUE(absl::StrContains(pixels.status().message(), "1x7x9"))
      << pixels.status();
}

TEST(ImageChannelsTest, WrongShapeNamesBothShapes) {
  // A 28x28 gray query for a 3x32x32 model, and the other way round.
  const std::string gray28 = PngBytes(Pattern(28, 28, 1, 0));
  absl::StatusOr<std::vector<float>> pixels =
      DecodeImage(gray28, ImageSpec{3, 32, 32}, "image");
  EXPECT_EQ(pixels.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pixels.status().message(),
            "image is 28x28 (height x width) with 1 channel (gray); the model "
            "takes 3x32x32 (channels x height x width), and images are not "
            "resized");
  const std::string rgb32x40 = PngBytes(Pattern(40, 32, 3, 0));
  pixels = DecodeImage(rgb32x40, ImageSpec{1, 28, 28}, "image");
  EXPECT_EQ(pixels.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(
      pixels.status().message(),
      "image is 32x40 (height x width) with 3 channels (RGB); the model "
      "takes 1x28x28"))
      << pixels.status();
  // Same size, other channel count: converted, not refused.
  EXPECT_TRUE(DecodeImage(gray28, ImageSpec{3, 28, 28}, "image").ok());
}

TEST(ImageChannelsTest, SizesUpTo256AndNoMore) {
  const Bytes largest = Pattern(256, 256, 3, 3);
  absl::StatusOr<std::vector<float>> pixels =
      DecodeImage(PngBytes(largest), ImageSpec{3, 256, 256}, "largest.png");
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  ExpectPixels(*pixels, largest, 3, [](int c) { return c; });

  // A file above the limit is refused from its header, whatever the model.
  const std::string too_large = PngBytes(Pattern(260, 300, 3, 3));
  pixels = DecodeImage(too_large, ImageSpec{3, 32, 32}, "big.png");
  EXPECT_EQ(pixels.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(
      pixels.status().message(),
      "big.png is 300x260 (height x width) with 3 channels (RGB), larger "
      "than the 256x256 retrace takes; the model takes 3x32x32"))
      << pixels.status();

  // A model shape above the limit, or not gray/RGB, or not given at all.
  for (const ImageSpec& bad :
       {ImageSpec{3, 300, 260}, ImageSpec{3, 257, 8}, ImageSpec{1, 8, 0},
        ImageSpec{4, 8, 8}, ImageSpec{2, 8, 8}, ImageSpec{}}) {
    SCOPED_TRACE(ImageSpecText(bad));
    EXPECT_EQ(ValidateImageSpec(bad).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(DecodeImage(too_large, bad, "x").status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(absl::StrContains(
      ValidateImageSpec(ImageSpec{3, 300, 260}).message(), "1..256"));
  EXPECT_TRUE(absl::StrContains(ValidateImageSpec(ImageSpec{}).message(),
                                "no image shape"));
  const std::string root = FreshDir("unset");
  std::filesystem::create_directories(root + "/a");
  WritePng(root + "/a/0.png", Pattern(8, 8, 1, 0));
  EXPECT_EQ(LoadImageFolder(root, ImageSpec{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LoadImageFolder(root, ImageSpec{1, 8, 8}).ok());
}

TEST(ImageChannelsTest, JpegFilesRgbAndGrayLooking) {
  // A smooth image keeps JPEG's error small; compared with what stb_image
  // decodes on its own (an independent decoder: its IDCT and upsampling
  // differ from libjpeg-turbo's by a level here and there).
  constexpr int kSide = 32;
  Bytes smooth{kSide, kSide, 3, {}};
  for (int y = 0; y < kSide; ++y) {
    for (int x = 0; x < kSide; ++x) {
      smooth.data.insert(
          smooth.data.end(),
          {static_cast<uint8_t>(40 + 4 * x), static_cast<uint8_t>(200 - 3 * y),
           static_cast<uint8_t>(90 + 2 * (x + y))});
    }
  }
  const std::string root = FreshDir("jpeg");
  std::filesystem::create_directories(root + "/a");
  ASSERT_NE(stbi_write_jpg((root + "/a/rgb.JPG").c_str(), kSide, kSide, 3,
                           smooth.data.data(), 95),
            0);
  const Bytes gray = Pattern(kSide, kSide, 1, 0);
  ASSERT_NE(stbi_write_jpg((root + "/a/gray.jpeg").c_str(), kSide, kSide, 1,
                           gray.data.data(), 95),
            0);
  absl::StatusOr<ImageSet> set = LoadImageFolder(root, {3, kSide, kSide});
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->size(), 2);
  ASSERT_EQ(set->paths[0], root + "/a/gray.jpeg");

  auto decoded = [](const std::string& path, int channels) {
    Bytes b;
    stbi_uc* data =
        stbi_load(path.c_str(), &b.width, &b.height, &b.channels, 0);
    EXPECT_NE(data, nullptr) << path;
    EXPECT_EQ(b.channels, channels) << path;
    if (data != nullptr) {
      b.data.assign(
          data, data + static_cast<size_t>(b.width) * b.height * b.channels);
      stbi_image_free(data);
    }
    return b;
  };
  // stb_image_write stores a gray picture as a three-component JPEG with
  // neutral chroma, so it decodes with R = G = B: the RGB model takes it as
  // is, and a gray model takes it too.
  const Bytes gray_file = decoded(root + "/a/gray.jpeg", 3);
  for (size_t i = 0; i < gray_file.data.size(); i += 3) {
    ASSERT_EQ(gray_file.data[i], gray_file.data[i + 1]) << i;
    ASSERT_EQ(gray_file.data[i], gray_file.data[i + 2]) << i;
  }
  ExpectPixels(
      set->Image(0), gray_file, 3, [](int c) { return c; }, 2);
  const Bytes rgb_file = decoded(root + "/a/rgb.JPG", 3);
  ExpectPixels(
      set->Image(1), rgb_file, 3, [](int c) { return c; }, 2);
  absl::StatusOr<std::vector<float>> gray_model = DecodeImage(
      ReadFile(root + "/a/gray.jpeg"), {1, kSide, kSide}, "gray.jpeg");
  ASSERT_TRUE(gray_model.ok()) << gray_model.status();
  ExpectPixels(
      *gray_model, gray_file, 1, [](int) { return 0; }, 2);
  // The gray model takes exactly the RGB model's first channel.
  for (int p = 0; p < kSide * kSide; ++p) {
    ASSERT_EQ((*gray_model)[p], set->Image(0)[p]) << p;
  }
  EXPECT_EQ(
      DecodeImage(ReadFile(root + "/a/rgb.JPG"), {1, kSide, kSide}, "rgb.JPG")
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  // And close to what was written (JPEG is lossy).
  for (int c = 0; c < 3; ++c) {
    for (int p = 0; p < kSide * kSide; ++p) {
      ASSERT_NEAR(set->Image(1)[c * kSide * kSide + p],
                  Expected(smooth.data[p * 3 + c]), 8 / 127.5)
          << "channel " << c << " pixel " << p;
    }
  }
}

TEST(ImageChannelsTest, MixtureFolderTakesTheCallersShape) {
  constexpr int kWidth = 10, kHeight = 6;
  const std::string root = FreshDir("mixture");
  std::filesystem::create_directories(root + "/a");
  const Bytes rgb = Pattern(kWidth, kHeight, 3, 11);
  const Bytes gray = Pattern(kWidth, kHeight, 1, 12);
  WritePng(root + "/a/0.png", rgb);
  WritePng(root + "/a/1.png", gray);
  absl::StatusOr<MixtureSpec> spec = ParseMixtureSpec("folder:path=" + root);
  ASSERT_TRUE(spec.ok()) << spec.status();
  spec->shuffle = false;
  DataLocations locations;
  locations.folder_spec = {3, kHeight, kWidth};
  absl::StatusOr<Mixture> mixture = BuildMixture(*spec, locations);
  ASSERT_TRUE(mixture.ok()) << mixture.status();
  EXPECT_EQ(mixture->images.channels, 3);
  EXPECT_EQ(mixture->images.height, kHeight);
  EXPECT_EQ(mixture->images.width, kWidth);
  ExpectPixels(mixture->images.Image(0), rgb, 3, [](int c) { return c; });
  ExpectPixels(mixture->images.Image(1), gray, 3, [](int) { return 0; });

  // The same folder for a gray model of that size: the colour file is refused
  // and named.
  locations.folder_spec = {1, kHeight, kWidth};
  mixture = BuildMixture(*spec, locations);
  EXPECT_EQ(mixture.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(mixture.status().message(),
                                root + "/a/0.png is a colour image"))
      << mixture.status();
}

TEST(ImageChannelsTest, RgbEncodePngGivesBackTheFileBytes) {
  // Pixels that came from bytes encode to the same PNG as those bytes.
  constexpr int kWidth = 11, kHeight = 5;
  const Bytes rgb = Pattern(kWidth, kHeight, 3, 77);
  absl::StatusOr<std::vector<float>> pixels =
      DecodeImage(PngBytes(rgb), ImageSpec{3, kHeight, kWidth}, "rgb.png");
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  absl::StatusOr<std::string> png =
      EncodePng(pixels->data(), 3, kHeight, kWidth);
  ASSERT_TRUE(png.ok()) << png.status();
  EXPECT_EQ(*png, PngBytes(rgb));
}

}  // namespace
}  // namespace retrace::data

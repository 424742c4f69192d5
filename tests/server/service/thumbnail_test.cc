// Thumbnails of RGB training data: each is the PNG of the bytes the image
// file held (stb_image_write on the same interleaved bytes, gray files
// replicated into R, G and B), for a folder read into an RGB model's shape.
// The store is a small synthetic one whose sample ids the mixture is given.
#include <gtest/gtest.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "server/data/image_folder.h"
#include "server/data/mixture.h"
#include "server/service/training_images.h"
#include "server/store/store_reader.h"
#include "tests/server/store/store_test_data.h"

namespace retrace::service {
namespace {

namespace fs = std::filesystem;

struct Bytes {
  int width = 0;
  int height = 0;
  int channels = 0;
  std::vector<uint8_t> data;  // interleaved [H, W, C]
};

// Channel c of pixel (x, y): (seed + 5x + 11y + 70c) mod 256.
Bytes Pattern(int width, int height, int channels, int seed) {
  Bytes b{width, height, channels, {}};
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        b.data.push_back(
            static_cast<uint8_t>((seed + 5 * x + 11 * y + 70 * c) % 256));
      }
    }
  }
  return b;
}

Bytes GrayToRgb(const Bytes& gray) {
  Bytes rgb{gray.width, gray.height, 3, {}};
  for (uint8_t v : gray.data) rgb.data.insert(rgb.data.end(), {v, v, v});
  return rgb;
}

std::string Png(const Bytes& b) {
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

std::string FreshDir(const std::string& leaf) {
  const std::string dir =
      ::testing::TempDir() + "/retrace_thumbnail_test_" + leaf;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

TEST(ThumbnailTest, RgbThumbnailsArePngsOfTheStoredPixels) {
  constexpr int kWidth = 24, kHeight = 16, kImages = 5;
  const std::string root = FreshDir("data");
  fs::create_directories(root + "/a");
  fs::create_directories(root + "/b");
  // Files in the order LoadImageFolder reads them (class, then name); the
  // third is gray and is shown replicated.
  std::vector<Bytes> shown;
  for (int i = 0; i < kImages; ++i) {
    const std::string path =
        root + (i < 3 ? "/a/" : "/b/") + std::to_string(i) + ".png";
    const Bytes file = Pattern(kWidth, kHeight, i == 2 ? 1 : 3, 40 * i);
    ASSERT_NE(
        stbi_write_png(path.c_str(), file.width, file.height, file.channels,
                       file.data.data(), file.width * file.channels),
        0);
    shown.push_back(file.channels == 1 ? GrayToRgb(file) : file);
  }
  absl::StatusOr<data::ImageSet> set =
      data::LoadImageFolder(root, data::ImageSpec{3, kHeight, kWidth});
  ASSERT_TRUE(set.ok()) << set.status();
  absl::StatusOr<data::MixtureSpec> spec =
      data::ParseMixtureSpec("folder:path=" + root);
  ASSERT_TRUE(spec.ok()) << spec.status();
  spec->shuffle = false;
  const data::ImageSet* sources[] = {&*set};
  absl::StatusOr<data::Mixture> mixture = data::MixImageSets(*spec, sources);
  ASSERT_TRUE(mixture.ok()) << mixture.status();

  const std::string store_dir = FreshDir("store");
  ASSERT_TRUE(
      store::testing::BuildStore(store_dir,
                                 store::testing::MakeSpec(kernels::DType::kF32,
                                                          /*replay=*/false, 4),
                                 kImages, /*seed=*/3)
          .ok());
  absl::StatusOr<std::unique_ptr<store::StoreReader>> reader =
      store::StoreReader::Open(store_dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (int n = 0; n < kImages; ++n) {
    mixture->sample_ids[n] = store::testing::SampleIdValue(n);
  }
  absl::StatusOr<std::unique_ptr<ImageSetTrainingImages>> images =
      ImageSetTrainingImages::Create(*std::move(mixture), **reader);
  ASSERT_TRUE(images.ok()) << images.status();

  for (int n = 0; n < kImages; ++n) {
    SCOPED_TRACE(n);
    absl::StatusOr<std::string> thumbnail = (*images)->ThumbnailPng(n);
    ASSERT_TRUE(thumbnail.ok()) << thumbnail.status();
    EXPECT_EQ(*thumbnail, Png(shown[n]));
    // And it decodes as a colour image of the model's size.
    int width = 0, height = 0, channels = 0;
    ASSERT_NE(
        stbi_info_from_memory(
            reinterpret_cast<const stbi_uc*>(thumbnail->data()),
            static_cast<int>(thumbnail->size()), &width, &height, &channels),
        0);
    EXPECT_EQ(width, kWidth);
    EXPECT_EQ(height, kHeight);
    EXPECT_EQ(channels, 3);
  }
  EXPECT_EQ((*images)->ThumbnailPng(kImages).status().code(),
            absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace retrace::service

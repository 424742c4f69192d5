// The contact sheet drawn straight from responses, no server: its size
// against the documented formula worked out by hand, and its pixels against
// the thumbnails it was given, scaled by nearest neighbour.
#include "client/contact_sheet.h"

#include <gtest/gtest.h>
#include <stb/stb_image.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/client/fake_server.h"

namespace retrace::client {
namespace {

using testing::EncodePng;
using testing::FakeAttribution;
using testing::FakeQueryClass;
using testing::FakeRetracIndex;
using testing::FakeThumbnailPixel;
using testing::FakeTracInIndex;

struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;

  // Grey value at (x, y); fails the test when the pixel is not grey.
  int Grey(int x, int y) const {
    const uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
    EXPECT_TRUE(p[0] == p[1] && p[1] == p[2])
        << "(" << x << ", " << y << ") is not grey";
    return p[0];
  }
};

Image Decode(const std::string& png) {
  Image image;
  int channels = 0;
  stbi_uc* pixels = stbi_load_from_memory(
      reinterpret_cast<const stbi_uc*>(png.data()),
      static_cast<int>(png.size()), &image.width, &image.height, &channels, 3);
  EXPECT_NE(pixels, nullptr) << stbi_failure_reason();
  if (pixels == nullptr) return image;
  image.rgb.assign(
      pixels, pixels + static_cast<size_t>(image.width) * image.height * 3);
  stbi_image_free(pixels);
  return image;
}

std::vector<uint8_t> QueryPixels() {
  std::vector<uint8_t> pixels(28 * 28);
  for (int i = 0; i < 28 * 28; ++i)
    pixels[i] = static_cast<uint8_t>(i * 7 % 251);
  return pixels;
}

v1::AttributeResponse Response(int k, bool opponents, bool both_methods,
                               const std::string& query) {
  v1::AttributeRequest request;
  request.set_image(query);
  request.set_top_k(k);
  request.set_opponents(opponents);
  request.set_include_thumbnails(true);
  if (!both_methods) request.add_methods(v1::RETRAC);
  return testing::FakeAttribution(request);
}

bool HaveFont() { return std::filesystem::exists(kDefaultSheetFont); }

TEST(ContactSheetSizeTest, MatchesTheFormulaWorkedOutByHand) {
  const SheetOptions options;  // T = 84, Q = 168, 5 columns
  // k = 10: 2 rows of 5. Panel 5*84 + 4*8 = 452 wide; a list is
  // 20 + 2*(84+30) + 8 = 256 high.
  SheetSize size = ContactSheetSize(10, true, 2, options);
  EXPECT_EQ(size.width, 32 + 168 + 2 * (24 + 452));         // 1152
  EXPECT_EQ(size.height, 32 + 28 + (26 + 256 + 12 + 256));  // 610
  size = ContactSheetSize(10, false, 2, options);
  EXPECT_EQ(size.height, 32 + 28 + (26 + 256));  // 342
  // k = 3: one row of 3 (268 wide, list 134 high); the query column
  // (26 + 168 + 30 = 224) is then the taller one.
  size = ContactSheetSize(3, false, 1, options);
  EXPECT_EQ(size.width, 32 + 168 + 24 + 268);  // 492
  EXPECT_EQ(size.height, 32 + 28 + 224);       // 284
  // k = 1 and k = 11 (a last row with one thumbnail).
  size = ContactSheetSize(1, false, 2, options);
  EXPECT_EQ(size.width, 32 + 168 + 2 * (24 + 84));
  size = ContactSheetSize(11, true, 2, options);
  EXPECT_EQ(size.height, 32 + 28 + 26 + 2 * (20 + 3 * 114 + 2 * 8) + 12);
  SheetOptions small;
  small.thumb_size = 28;
  small.query_size = 56;
  small.columns = 10;
  size = ContactSheetSize(10, true, 2, small);
  EXPECT_EQ(size.width, 32 + 56 + 2 * (24 + 10 * 28 + 9 * 8));
  EXPECT_EQ(size.height, 32 + 28 + 26 + 2 * (20 + 58) + 12);
}

TEST(ContactSheetTest, DrawsTheQueryAndEveryThumbnailWhereTheLayoutSays) {
  if (!HaveFont()) GTEST_SKIP() << kDefaultSheetFont << " is not installed";
  const std::vector<uint8_t> query_pixels = QueryPixels();
  const std::string query = EncodePng(28, 28, 1, query_pixels);
  const v1::AttributeResponse response = Response(10, true, true, query);
  SheetOptions options;
  options.title = "query.png";
  absl::StatusOr<std::string> png =
      RenderContactSheet(response, query, options);
  ASSERT_TRUE(png.ok()) << png.status();
  const Image sheet = Decode(*png);
  ASSERT_EQ(sheet.width, 1152);
  ASSERT_EQ(sheet.height, 610);

  // The query: 28 -> 168 is a factor of 6, at (16, 16 + 28 + 26).
  for (int y = 0; y < 28; ++y) {
    for (int x = 0; x < 28; ++x) {
      for (const int dy : {0, 5}) {
        for (const int dx : {0, 5}) {
          ASSERT_EQ(sheet.Grey(16 + 6 * x + dx, 70 + 6 * y + dy),
                    query_pixels[y * 28 + x])
              << "query pixel " << x << ", " << y;
        }
      }
    }
  }
  // Thumbnails: 28 -> 84 is a factor of 3; panels start at x = 16 + 168 +
  // 24 and 452 + 24 further; lists at y = 70 + 20 and 70 + 256 + 12 + 20.
  const int32_t query_class = FakeQueryClass(query);
  for (int panel = 0; panel < 2; ++panel) {
    for (int list = 0; list < 2; ++list) {
      for (int rank = 1; rank <= 10; ++rank) {
        SCOPED_TRACE(
            absl::StrCat("panel ", panel, " list ", list, " rank ", rank));
        const int at = list == 0 ? rank : 61 - rank;  // opponents mirror
        const int64_t index =
            panel == 0 ? FakeTracInIndex(at) : FakeRetracIndex(query_class, at);
        const int i = rank - 1;
        const int left = 208 + panel * (452 + 24) + (i % 5) * (84 + 8);
        const int top = 90 + list * (256 + 12) + (i / 5) * (84 + 30 + 8);
        for (int y = 0; y < 28; ++y) {
          for (int x = 0; x < 28; ++x) {
            ASSERT_EQ(sheet.Grey(left + 3 * x + 1, top + 3 * y + 1),
                      FakeThumbnailPixel(index, x, y))
                << "pixel " << x << ", " << y << " of sample " << index;
          }
        }
      }
    }
  }
  // Captions and headers put dark text pixels under the first thumbnail and
  // above the panels.
  auto dark_pixels = [&](int x0, int y0, int w, int h) {
    int count = 0;
    for (int y = y0; y < y0 + h; ++y) {
      for (int x = x0; x < x0 + w; ++x) {
        if (sheet.rgb[(static_cast<size_t>(y) * sheet.width + x) * 3] < 100) {
          ++count;
        }
      }
    }
    return count;
  };
  EXPECT_GT(dark_pixels(208, 90 + 84 + 2, 84, 14), 20);  // "#1  1.02e+03"
  EXPECT_GT(dark_pixels(208, 44, 80, 22), 20);           // "TracIn"
  EXPECT_GT(dark_pixels(684, 44, 80, 22), 20);           // "ReTrac"
  // Output to look at when changing the layout.
  std::ofstream(::testing::TempDir() + "/retrace_contact_sheet_test.png",
                std::ios::binary)
      << *png;
}

TEST(ContactSheetTest, OneMethodWithoutOpponents) {
  if (!HaveFont()) GTEST_SKIP() << kDefaultSheetFont << " is not installed";
  const std::string query = EncodePng(28, 28, 1, QueryPixels());
  absl::StatusOr<std::string> png = RenderContactSheet(
      Response(3, false, false, query), query, SheetOptions());
  ASSERT_TRUE(png.ok()) << png.status();
  const Image sheet = Decode(*png);
  EXPECT_EQ(sheet.width, 492);
  EXPECT_EQ(sheet.height, 284);
}

TEST(ContactSheetTest, MissingOrBrokenImagesBecomeGreyBoxes) {
  if (!HaveFont()) GTEST_SKIP() << kDefaultSheetFont << " is not installed";
  v1::AttributeResponse response = Response(4, false, true, "query");
  response.mutable_results(0)->mutable_proponents(0)->clear_thumbnail_png();
  response.mutable_results(0)->mutable_proponents(1)->set_thumbnail_png("junk");
  absl::StatusOr<std::string> png =
      RenderContactSheet(response, "not an image", SheetOptions());
  ASSERT_TRUE(png.ok()) << png.status();
  const Image sheet = Decode(*png);
  EXPECT_EQ(sheet.width, ContactSheetSize(4, false, 2, SheetOptions()).width);
  // The corner of the empty box shows the grey background.
  EXPECT_EQ(sheet.Grey(209, 91), 225);
  EXPECT_EQ(sheet.Grey(17, 71), 225);
}

TEST(ContactSheetTest, LargeAndColourThumbnailsAreShrunkIntoTheBox) {
  if (!HaveFont()) GTEST_SKIP() << kDefaultSheetFont << " is not installed";
  // 200 x 100 pure red: shrunk to 84 x 42, centred vertically.
  const std::vector<uint8_t> red = [] {
    std::vector<uint8_t> pixels(200 * 100 * 3, 0);
    for (size_t i = 0; i < pixels.size(); i += 3) pixels[i] = 255;
    return pixels;
  }();
  v1::AttributeResponse response = Response(1, false, false, "q");
  response.mutable_results(0)->mutable_proponents(0)->set_thumbnail_png(
      EncodePng(200, 100, 3, red));
  absl::StatusOr<std::string> png =
      RenderContactSheet(response, "q", SheetOptions());
  ASSERT_TRUE(png.ok()) << png.status();
  const Image sheet = Decode(*png);
  const int left = 208;
  const int top = 90;
  auto pixel = [&](int x, int y) {
    const uint8_t* p =
        &sheet.rgb[(static_cast<size_t>(y) * sheet.width + x) * 3];
    return std::vector<int>{p[0], p[1], p[2]};
  };
  EXPECT_EQ(pixel(left + 42, top + 42), (std::vector<int>{255, 0, 0}));
  EXPECT_EQ(pixel(left + 42, top + 21), (std::vector<int>{255, 0, 0}));
  EXPECT_EQ(pixel(left + 42, top + 5), (std::vector<int>{225, 225, 225}));
}

// Colour pixel (x, y) of a 32x32 RGB thumbnail: red from the sample, green
// and blue from the position.
std::vector<int> ColourThumbnailPixel(int64_t index, int x, int y) {
  return {static_cast<int>(30 + (index * 37) % 200), 8 * x, 255 - 8 * y};
}

TEST(ContactSheetTest, RgbThumbnailsAndQueryAreDrawnInColour) {
  if (!HaveFont()) GTEST_SKIP() << kDefaultSheetFont << " is not installed";
  constexpr int kSide = 32;
  // The query: a colour gradient, 32 -> 168 is a factor of 5 (160x160,
  // centred: 4 pixels in).
  std::vector<uint8_t> query_pixels;
  for (int y = 0; y < kSide; ++y) {
    for (int x = 0; x < kSide; ++x) {
      query_pixels.insert(query_pixels.end(), {static_cast<uint8_t>(7 * x), 90,
                                               static_cast<uint8_t>(7 * y)});
    }
  }
  const std::string query = EncodePng(kSide, kSide, 3, query_pixels);
  v1::AttributeResponse response = Response(10, false, true, query);
  for (v1::MethodResult& result : *response.mutable_results()) {
    for (v1::AttributedSample& sample : *result.mutable_proponents()) {
      std::vector<uint8_t> rgb;
      for (int y = 0; y < kSide; ++y) {
        for (int x = 0; x < kSide; ++x) {
          for (int v : ColourThumbnailPixel(sample.index(), x, y)) {
            rgb.push_back(static_cast<uint8_t>(v));
          }
        }
      }
      sample.set_thumbnail_png(EncodePng(kSide, kSide, 3, rgb));
    }
  }
  absl::StatusOr<std::string> png =
      RenderContactSheet(response, query, SheetOptions());
  ASSERT_TRUE(png.ok()) << png.status();
  const Image sheet = Decode(*png);
  ASSERT_EQ(sheet.width, 1152);
  ASSERT_EQ(sheet.height, 342);
  auto pixel = [&](int x, int y) {
    const uint8_t* p =
        &sheet.rgb[(static_cast<size_t>(y) * sheet.width + x) * 3];
    return std::vector<int>{p[0], p[1], p[2]};
  };
  for (int y = 0; y < kSide; ++y) {
    for (int x = 0; x < kSide; ++x) {
      const uint8_t* q = &query_pixels[(y * kSide + x) * 3];
      ASSERT_EQ(pixel(16 + 4 + 5 * x + 2, 70 + 4 + 5 * y + 2),
                (std::vector<int>{q[0], q[1], q[2]}))
          << "query pixel " << x << ", " << y;
    }
  }
  // Thumbnails: 32 -> 84 fits a factor of 2 (64x64, 10 pixels in).
  for (int panel = 0; panel < 2; ++panel) {
    const v1::MethodResult& result = response.results(panel);
    for (int i = 0; i < result.proponents_size(); ++i) {
      const int64_t index = result.proponents(i).index();
      SCOPED_TRACE(
          absl::StrCat("panel ", panel, " rank ", i + 1, " sample ", index));
      const int left = 208 + panel * (452 + 24) + (i % 5) * (84 + 8) + 10;
      const int top = 90 + (i / 5) * (84 + 30 + 8) + 10;
      for (int y = 0; y < kSide; ++y) {
        for (int x = 0; x < kSide; ++x) {
          for (const int d : {0, 1}) {
            ASSERT_EQ(pixel(left + 2 * x + d, top + 2 * y + d),
                      ColourThumbnailPixel(index, x, y))
                << "pixel " << x << ", " << y;
          }
        }
      }
    }
  }
}

TEST(ContactSheetTest, Errors) {
  const v1::AttributeResponse empty;
  SheetOptions options;
  if (HaveFont()) {
    const absl::StatusOr<std::string> none =
        RenderContactSheet(empty, "", options);
    EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  }
  options.font_path = ::testing::TempDir() + "/no-such-font.ttf";
  absl::Status status = ValidateSheetOptions(options);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(status.message(), "fonts-dejavu-core"))
      << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "no-such-font.ttf"));

  const std::string not_a_font = ::testing::TempDir() + "/not-a-font.ttf";
  std::ofstream(not_a_font) << "these bytes are not a TrueType font";
  options.font_path = not_a_font;
  EXPECT_EQ(ValidateSheetOptions(options).code(),
            absl::StatusCode::kInvalidArgument);

  options = SheetOptions();
  options.thumb_size = 8;
  EXPECT_EQ(ValidateSheetOptions(options).code(),
            absl::StatusCode::kInvalidArgument);
  options = SheetOptions();
  options.columns = 0;
  EXPECT_EQ(ValidateSheetOptions(options).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::client

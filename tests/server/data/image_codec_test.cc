// The strict decoding policy of image_codec.h, on files built chunk by chunk
// (PNG) or with libjpeg's encoder (JPEG), so each oddity is exactly the one
// under test.
#include "server/data/image_codec.h"

// clang-format off: jpeglib.h needs stdio.h (FILE) before it.
#include <jpeglib.h>

#include <cstdio>
// clang-format on
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/data/image_folder.h"

namespace retrace::data {
namespace {

using ::testing::HasSubstr;

absl::Status AcceptAll(const ImageHeader&) { return absl::OkStatus(); }

void AppendBigEndian(std::string* out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out->push_back(static_cast<char>((v >> shift) & 0xff));
  }
}

std::string Chunk(const std::string& type, const std::string& data) {
  std::string out;
  AppendBigEndian(&out, static_cast<uint32_t>(data.size()));
  const std::string body = type + data;
  out += body;
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(body.data()),
              static_cast<uInt>(body.size()));
  AppendBigEndian(&out, static_cast<uint32_t>(crc));
  return out;
}

std::string Deflate(const std::string& raw) {
  uLongf size = compressBound(static_cast<uLong>(raw.size()));
  std::string out(size, '\0');
  EXPECT_EQ(compress(reinterpret_cast<Bytef*>(out.data()), &size,
                     reinterpret_cast<const Bytef*>(raw.data()),
                     static_cast<uLong>(raw.size())),
            Z_OK);
  out.resize(size);
  return out;
}

struct PngParts {
  uint32_t width = 4;
  uint32_t height = 3;
  int bit_depth = 8;
  int color_type = 0;       // 0 gray, 2 RGB, 3 palette, 4 GA, 6 RGBA
  std::string before_idat;  // extra chunks between IHDR and IDAT
  std::string after_idat;   // extra chunks between IDAT and IEND
  std::string palette;      // PLTE data for colour type 3
  std::string rows;         // filtered scanlines (filter byte + data)
};

std::string Ihdr(const PngParts& p) {
  std::string data;
  AppendBigEndian(&data, p.width);
  AppendBigEndian(&data, p.height);
  data += static_cast<char>(p.bit_depth);
  data += static_cast<char>(p.color_type);
  data += std::string("\0\0\0", 3);  // compression, filter, interlace
  return data;
}

std::string BuildPng(const PngParts& p) {
  std::string png = "\x89PNG\r\n\x1a\n";
  png += Chunk("IHDR", Ihdr(p));
  png += p.before_idat;
  if (!p.palette.empty()) png += Chunk("PLTE", p.palette);
  png += Chunk("IDAT", Deflate(p.rows));
  png += p.after_idat;
  png += Chunk("IEND", "");
  return png;
}

// Rows of `bytes_per_row` bytes each, filter type 0, value = f(row, byte).
std::string Rows(uint32_t height, uint32_t bytes_per_row) {
  std::string rows;
  for (uint32_t y = 0; y < height; ++y) {
    rows += '\0';
    for (uint32_t x = 0; x < bytes_per_row; ++x) {
      rows += static_cast<char>((y * 37 + x * 11) & 0xff);
    }
  }
  return rows;
}

PngParts Gray8() {
  PngParts p;
  p.rows = Rows(p.height, p.width);
  return p;
}

TEST(ImageCodecTest, EightBitGrayPngDecodes) {
  const PngParts p = Gray8();
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(BuildPng(p), "image", AcceptAll);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_STREQ(out->header.format, "PNG");
  EXPECT_EQ(out->header.width, 4);
  EXPECT_EQ(out->header.height, 3);
  EXPECT_EQ(out->header.channels, 1);
  ASSERT_EQ(out->pixels.size(), 12u);
  for (uint32_t y = 0; y < 3; ++y) {
    for (uint32_t x = 0; x < 4; ++x) {
      EXPECT_EQ(out->pixels[y * 4 + x], (y * 37 + x * 11) & 0xff);
    }
  }
}

TEST(ImageCodecTest, PalettePngExpandsToRgb) {
  PngParts p;
  p.color_type = 3;
  p.palette = std::string("\x10\x20\x30\xa0\xb0\xc0", 6);
  p.rows.clear();
  for (uint32_t y = 0; y < p.height; ++y) {
    p.rows += '\0';
    for (uint32_t x = 0; x < p.width; ++x) p.rows += static_cast<char>(x & 1);
  }
  // A transparency chunk is allowed and dropped like any alpha.
  p.before_idat = "";
  std::string png = BuildPng(p);
  absl::StatusOr<DecodedPixels> out = DecodePixels(png, "image", AcceptAll);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->header.channels, 3);
  ASSERT_EQ(out->pixels.size(), 36u);
  EXPECT_EQ(out->pixels[0], 0x10);
  EXPECT_EQ(out->pixels[3], 0xa0);
  EXPECT_EQ(out->pixels[5], 0xc0);
}

TEST(ImageCodecTest, OneBitGrayPngExpandsToEightBits) {
  PngParts p;
  p.width = 8;
  p.height = 1;
  p.bit_depth = 1;
  p.rows = std::string("\0\xa5", 2);  // 1010 0101
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(BuildPng(p), "image", AcceptAll);
  ASSERT_TRUE(out.ok()) << out.status();
  const std::vector<uint8_t> want = {255, 0, 255, 0, 0, 255, 0, 255};
  EXPECT_EQ(out->pixels, want);
}

TEST(ImageCodecTest, SixteenBitPngIsRefused) {
  PngParts p;
  p.bit_depth = 16;
  p.rows = Rows(p.height, p.width * 2);
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(BuildPng(p), "image", AcceptAll);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("16-bit"));
  EXPECT_THAT(out.status().message(), HasSubstr("image: "));
}

TEST(ImageCodecTest, BrokenCrcIsRefusedWhereverItIs) {
  const std::string good = BuildPng(Gray8());
  // IHDR's CRC, IDAT's CRC, and the CRC of a text chunk before and after
  // the pixels (ancillary chunks, which libpng would by default skip).
  PngParts with_text = Gray8();
  with_text.before_idat = Chunk("tEXt", std::string("Title\0a", 7));
  with_text.after_idat = Chunk("tEXt", std::string("Note\0b", 6));
  const std::string text = BuildPng(with_text);
  ASSERT_TRUE(DecodePixels(text, "image", AcceptAll).ok());
  auto crc_end_of = [](const std::string& png, const std::string& type,
                       size_t from) {
    const size_t at = png.find(type, from);
    EXPECT_NE(at, std::string::npos) << type;
    const uint32_t length = (static_cast<uint8_t>(png[at - 4]) << 24) |
                            (static_cast<uint8_t>(png[at - 3]) << 16) |
                            (static_cast<uint8_t>(png[at - 2]) << 8) |
                            static_cast<uint8_t>(png[at - 1]);
    return at + 4 + length + 3;  // last byte of the chunk's CRC
  };
  struct Case {
    std::string png;
    size_t byte;
  };
  const size_t idat = text.find("IDAT");
  const std::vector<Case> cases = {
      {good, crc_end_of(good, "IHDR", 0)},
      {good, crc_end_of(good, "IDAT", 0)},
      {text, crc_end_of(text, "tEXt", 0)},
      {text, crc_end_of(text, "tEXt", idat)},
  };
  for (const Case& c : cases) {
    std::string damaged = c.png;
    damaged[c.byte] = static_cast<char>(damaged[c.byte] ^ 0x01);
    absl::StatusOr<DecodedPixels> out =
        DecodePixels(damaged, "image", AcceptAll);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument)
        << "byte " << c.byte;
    EXPECT_THAT(out.status().message(), HasSubstr("CRC")) << out.status();
  }
}

TEST(ImageCodecTest, DamagedPixelDataIsRefused) {
  PngParts p = Gray8();
  // Too few rows in the compressed stream, and one more than the header says.
  p.rows = Rows(p.height - 1, p.width);
  EXPECT_EQ(DecodePixels(BuildPng(p), "image", AcceptAll).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.rows = Rows(p.height + 1, p.width);
  EXPECT_EQ(DecodePixels(BuildPng(p), "image", AcceptAll).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A truncated file at every length.
  const std::string good = BuildPng(Gray8());
  for (size_t n = 1; n < good.size(); ++n) {
    EXPECT_EQ(
        DecodePixels(good.substr(0, n), "image", AcceptAll).status().code(),
        absl::StatusCode::kInvalidArgument)
        << n;
  }
}

TEST(ImageCodecTest, AnimatedPngIsRefused) {
  PngParts p = Gray8();
  std::string actl;
  AppendBigEndian(&actl, 2);  // frames
  AppendBigEndian(&actl, 0);  // plays
  p.before_idat = Chunk("acTL", actl);
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(BuildPng(p), "image", AcceptAll);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("animated"));
}

TEST(ImageCodecTest, UnknownCriticalChunkIsRefused) {
  PngParts p = Gray8();
  p.before_idat = Chunk("ZZZZ", "x");
  EXPECT_EQ(DecodePixels(BuildPng(p), "image", AcceptAll).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.before_idat = Chunk("zzZz", "x");  // ancillary: skipped
  EXPECT_TRUE(DecodePixels(BuildPng(p), "image", AcceptAll).ok());
}

TEST(ImageCodecTest, HeaderIsCheckedBeforeThePixels) {
  // 30000 x 30000 in the header, and no pixel data at all: the check sees
  // the header and its refusal is returned as it is.
  PngParts p = Gray8();
  p.width = 30000;
  p.height = 30000;
  p.rows = "";
  ImageHeader seen;
  const absl::Status refusal = absl::InvalidArgumentError("too large");
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(BuildPng(p), "image", [&](const ImageHeader& header) {
        seen = header;
        return refusal;
      });
  EXPECT_EQ(out.status(), refusal);
  EXPECT_EQ(seen.width, 30000);
  EXPECT_EQ(seen.height, 30000);
  // Through DecodeImage the message names the file's and the model's shape.
  absl::StatusOr<std::vector<float>> image =
      DecodeImage(BuildPng(p), {1, 28, 28}, "image");
  ASSERT_EQ(image.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(image.status().message(), HasSubstr("30000x30000"));
  EXPECT_THAT(image.status().message(), HasSubstr("larger than the 256x256"));
}

TEST(ImageCodecTest, OtherFormatsNameTheirFirstBytes) {
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(std::string("GIF89a\x01\x00", 8), "image", AcceptAll);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(),
              HasSubstr("not a PNG or JPEG file (it starts with bytes 47 49 "
                        "46 38 39 61 01 00)"));
  EXPECT_EQ(DecodePixels("", "image", AcceptAll).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- JPEG
// -----------------------------------------------------------------------

struct JpegOptions {
  int width = 16;
  int height = 16;
  int components = 3;
  J_COLOR_SPACE space = JCS_RGB;
  bool progressive = false;
};

std::string EncodeJpeg(const JpegOptions& o) {
  jpeg_compress_struct cinfo;
  jpeg_error_mgr errors;
  cinfo.err = jpeg_std_error(&errors);
  jpeg_create_compress(&cinfo);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&cinfo, &buffer, &size);
  cinfo.image_width = o.width;
  cinfo.image_height = o.height;
  cinfo.input_components = o.components;
  cinfo.in_color_space = o.space;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, 95, TRUE);
  if (o.progressive) jpeg_simple_progression(&cinfo);
  jpeg_start_compress(&cinfo, TRUE);
  std::vector<unsigned char> row(static_cast<size_t>(o.width) * o.components);
  while (cinfo.next_scanline < cinfo.image_height) {
    for (size_t i = 0; i < row.size(); ++i) {
      row[i] = static_cast<unsigned char>(64 + (i + cinfo.next_scanline) % 64);
    }
    JSAMPROW pointer = row.data();
    jpeg_write_scanlines(&cinfo, &pointer, 1);
  }
  jpeg_finish_compress(&cinfo);
  std::string out(reinterpret_cast<const char*>(buffer), size);
  jpeg_destroy_compress(&cinfo);
  free(buffer);
  return out;
}

TEST(ImageCodecTest, JpegGrayColourAndProgressiveDecode) {
  absl::StatusOr<DecodedPixels> rgb =
      DecodePixels(EncodeJpeg({}), "image", AcceptAll);
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_STREQ(rgb->header.format, "JPEG");
  EXPECT_EQ(rgb->header.channels, 3);
  EXPECT_EQ(rgb->pixels.size(), 16u * 16 * 3);

  JpegOptions gray;
  gray.components = 1;
  gray.space = JCS_GRAYSCALE;
  absl::StatusOr<DecodedPixels> g =
      DecodePixels(EncodeJpeg(gray), "image", AcceptAll);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->header.channels, 1);
  EXPECT_EQ(g->pixels.size(), 16u * 16);

  JpegOptions progressive;
  progressive.progressive = true;
  absl::StatusOr<DecodedPixels> p =
      DecodePixels(EncodeJpeg(progressive), "image", AcceptAll);
  ASSERT_TRUE(p.ok()) << p.status();
  // Same coefficients, another order: the same pixels as baseline.
  EXPECT_EQ(p->pixels, rgb->pixels);
}

TEST(ImageCodecTest, CmykJpegIsRefused) {
  JpegOptions cmyk;
  cmyk.components = 4;
  cmyk.space = JCS_CMYK;
  absl::StatusOr<DecodedPixels> out =
      DecodePixels(EncodeJpeg(cmyk), "image", AcceptAll);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("CMYK"));
}

TEST(ImageCodecTest, CorruptOrTruncatedJpegIsRefused) {
  const std::string good = EncodeJpeg({});
  // Cut inside the entropy-coded data: libjpeg would pad it with gray and
  // warn; here that is an error.
  absl::StatusOr<DecodedPixels> cut =
      DecodePixels(good.substr(0, good.size() - 40), "image", AcceptAll);
  ASSERT_EQ(cut.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(cut.status().message(), HasSubstr("JPEG"));
  // A marker inside the entropy-coded data.
  std::string damaged = good;
  const size_t sos = damaged.find("\xff\xda");
  ASSERT_NE(sos, std::string::npos);
  damaged[sos + 30] = '\xff';
  damaged[sos + 31] = '\xd0' + 5;
  EXPECT_EQ(DecodePixels(damaged, "image", AcceptAll).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retrace::data

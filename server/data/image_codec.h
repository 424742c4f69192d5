// Decoding untrusted PNG and JPEG bytes (query images arrive from the
// network) with libpng and libjpeg-turbo, both fuzzed continuously upstream.
//
// The file's header is read first and handed to the caller, which refuses
// any shape it does not take before a single pixel buffer is allocated: a
// 1 kB PNG can claim 30000 x 30000 pixels. Everything else is strict, and the
// policy is the same for training folders and query images:
//   * PNG: 8-bit (and 1/2/4-bit gray, expanded to 8 bits) gray, gray + alpha,
//     RGB, RGBA and palette images (expanded to RGB; a palette's
//     transparency is ignored like any alpha), interlaced or not. Refused:
//     16-bit samples (how 16 bits become 8 is the model's training
//     pipeline's choice, not ours), animated PNGs (which frame?), and any
//     damage: a CRC mismatch in any chunk (critical or ancillary, before or
//     after the pixels), a bad zlib checksum, truncated or extra image data,
//     and what libpng calls benign errors.
//   * JPEG: 8-bit baseline, extended and progressive files with 1 (gray) or
//     3 (YCbCr or RGB) components, decoded as libjpeg-turbo (and so Pillow)
//     decodes them by default. Refused: CMYK/YCCK (4 components; convert to
//     RGB first), other component counts and precisions, progressive files
//     with more than kMaxJpegScans scans (a known way to spend minutes of CPU
//     on a small file), and any data libjpeg reports as corrupt (a warning
//     there is an error here).
//   * No gamma, ICC profile or colour-space conversion: stored values are
//     used as they are.
// Every refusal is INVALID_ARGUMENT whose message starts with the caller's
// `what` and says what was wrong.
#ifndef RETRACE_SERVER_DATA_IMAGE_CODEC_H_
#define RETRACE_SERVER_DATA_IMAGE_CODEC_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retrace::data {

// The most scans a progressive JPEG may have (TurboJPEG's own limit).
inline constexpr int kMaxJpegScans = 500;

// What a file's header says, in the form the pixels will be returned in.
struct ImageHeader {
  const char* format = "";  // "PNG" or "JPEG"
  int64_t width = 0;
  int64_t height = 0;
  int channels = 0;  // 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA
};

// 8-bit pixels, interleaved, row-major: pixels[(y * width + x) * channels + c].
struct DecodedPixels {
  ImageHeader header;
  std::vector<uint8_t> pixels;
};

// Called with the header before anything is allocated for the pixels; a
// non-ok status is returned from DecodePixels as it is.
using HeaderCheck = std::function<absl::Status(const ImageHeader&)>;

// Decodes PNG or JPEG `bytes` (recognised by their signature) under the
// policy above. `what` names the input at the start of every error.
absl::StatusOr<DecodedPixels> DecodePixels(absl::string_view bytes,
                                           absl::string_view what,
                                           const HeaderCheck& check);

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_IMAGE_CODEC_H_

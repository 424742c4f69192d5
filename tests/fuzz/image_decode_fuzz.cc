// Query image decoding: any bytes through DecodePixels (a header check that
// takes up to 64 x 64, so the pixel paths run) and DecodeImage for a gray
// and an RGB model. Properties: no crash, sanitizer report or leak; success
// returns exactly width x height x channels bytes, and floats in [-1, 1].
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "absl/strings/string_view.h"
#include "server/data/image_codec.h"
#include "server/data/image_folder.h"
#include "tests/fuzz/require.h"

namespace {

using retrace::fuzz::Require;

using retrace::data::DecodedPixels;
using retrace::data::ImageHeader;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<DecodedPixels> pixels = retrace::data::DecodePixels(
      bytes, "image", [](const ImageHeader& header) -> absl::Status {
        if (header.width < 1 || header.width > 64 || header.height < 1 ||
            header.height > 64) {
          return absl::InvalidArgumentError("outside 1..64");
        }
        return absl::OkStatus();
      });
  if (pixels.ok()) {
    const ImageHeader& h = pixels->header;
    Require(h.channels >= 1 && h.channels <= 4);
    Require(pixels->pixels.size() ==
            static_cast<size_t>(h.width * h.height * h.channels));
  } else {
    Require(!pixels.status().message().empty());
  }
  for (const retrace::data::ImageSpec spec :
       {retrace::data::ImageSpec{1, 8, 8}, retrace::data::ImageSpec{3, 8, 8}}) {
    absl::StatusOr<std::vector<float>> image =
        retrace::data::DecodeImage(bytes, spec, "image");
    if (!image.ok()) continue;
    Require(image->size() ==
            static_cast<size_t>(spec.channels * spec.height * spec.width));
    for (float v : *image) Require(v >= -1.0f && v <= 1.0f);
  }
  return 0;
}

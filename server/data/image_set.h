// ImageSet: a set of same-sized images with integer labels, as every dataset
// reader in retrace_data returns it.
//
// Pixels are float32 in [-1, 1] (byte b maps to b/127.5 − 1; a [0, 1] value v
// to 2v − 1), stored image after image, each image channel-major [C, H, W].
// Plain value type: copyable, no hidden state, safe to read from many threads.
#ifndef RETRACE_SERVER_DATA_IMAGE_SET_H_
#define RETRACE_SERVER_DATA_IMAGE_SET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/types/span.h"

namespace retrace::data {

struct ImageSet {
  // Source name as recorded in provenance: "fashion-mnist/train", "mnist",
  // "folder:<root>".
  std::string name;
  int64_t channels = 1;
  int64_t height = 0;
  int64_t width = 0;
  std::vector<float> pixels;    // size() · channels · height · width values
  std::vector<int32_t> labels;  // one per image
  // Optional: label -> class name ("T-shirt/top", a sub-folder name); empty
  // when the source has none.
  std::vector<std::string> class_names;
  // Optional: the file each image came from (image folders); empty otherwise.
  std::vector<std::string> paths;

  int64_t size() const { return static_cast<int64_t>(labels.size()); }
  int64_t image_numel() const { return channels * height * width; }
  // Image i, i in [0, size()).
  absl::Span<const float> Image(int64_t i) const {
    return absl::MakeConstSpan(pixels).subspan(i * image_numel(),
                                               image_numel());
  }
};

// b/127.5 − 1, exact for every byte value in float.
inline float ByteToPixel(uint8_t value) {
  return static_cast<float>(value) / 127.5f - 1.0f;
}

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_IMAGE_SET_H_

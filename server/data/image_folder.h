// Images from files: decoding PNG/JPEG bytes (stb_image) and reading a folder
// tree whose sub-folder names are the class labels:
//   root/<class name>/<image>.{png,jpg,jpeg}   (extensions case-insensitive)
#ifndef RETRACE_SERVER_DATA_IMAGE_FOLDER_H_
#define RETRACE_SERVER_DATA_IMAGE_FOLDER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/data/image_set.h"

namespace retrace::data {

// What every image must be; nothing is resized or converted, so a mismatch is
// an error rather than a silent change of the data.
struct ImageSpec {
  int64_t channels = 1;  // 1 (gray), 3 (RGB) or 4 (RGBA)
  int64_t height = 28;
  int64_t width = 28;
};

// Decodes PNG or JPEG bytes into `spec.channels · height · width` floats in
// [-1, 1], channel-major [C, H, W]. `what` names the input in errors (a file
// path, "request image"). INVALID_ARGUMENT when the bytes cannot be decoded or
// the image's size or channel count differs from `spec` (the message gives
// both).
absl::StatusOr<std::vector<float>> DecodeImage(absl::string_view bytes,
                                               const ImageSpec& spec,
                                               absl::string_view what);

// The inverse: encodes `channels · height · width` floats in [-1, 1],
// channel-major, as an 8-bit PNG (1, 3 or 4 channels; values clamped, NaN as
// black). INVALID_ARGUMENT for other channel counts or sizes.
absl::StatusOr<std::string> EncodePng(const float* pixels, int64_t channels,
                                      int64_t height, int64_t width);

// Reads every image under `root`. Classes are the sub-folders in byte-wise
// name order, labelled 0, 1, ...; images within a class in file-name order,
// so the result depends only on the tree's contents. Files with other
// extensions and hidden entries are ignored. The set is named
// "folder:<root>" and records class_names and paths. NOT_FOUND when root is
// missing; INVALID_ARGUMENT for a tree without classes or images, or an image
// that does not decode or match `spec` (naming the file).
absl::StatusOr<ImageSet> LoadImageFolder(const std::string& root,
                                         const ImageSpec& spec);

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_IMAGE_FOLDER_H_

// Images from files: decoding PNG/JPEG bytes (image_codec.h: libpng and
// libjpeg-turbo, strict about damage and oddities) into the shape a
// model takes, and reading a folder tree whose sub-folder names are the class
// labels:
//   root/<class name>/<image>.{png,jpg,jpeg}   (extensions case-insensitive)
//
// Conversion policy, the same for training folders and query images:
//   * Nothing is resized, cropped or padded: an image whose height or width
//     differs from the model's is refused (INVALID_ARGUMENT naming both
//     shapes). Height and width are at most kMaxImageSide (256); larger
//     files are refused from their header, before any pixel is decoded.
//   * The channel count is converted where the result is unambiguous and
//     loses nothing the model could use:
//       file \ model   gray model (C = 1)         RGB model (C = 3)
//       gray           as is                      replicated, R = G = B
//       gray + alpha   alpha dropped              alpha dropped, replicated
//       RGB            only if R = G = B at       as is
//                      every pixel
//       RGBA           as RGB, alpha dropped      alpha dropped
//     Alpha is dropped, not composited over a background: a transparent
//     pixel keeps its stored colour (as Pillow's convert("RGB") does).
//   * A colour image (some pixel with R, G, B not all equal) for a gray model
//     is refused, naming the first such pixel. There is no one gray formula
//     (Pillow's convert("L") rounds ITU-R 601 luma to a byte, torchvision's
//     rgb_to_grayscale keeps it in floats, others average), and one that
//     differs from the model's own training pipeline would shift every image
//     without a trace; convert such files with that pipeline first.
//   * 8-bit values b become b/127.5 − 1 (ByteToPixel); palette PNGs are
//     expanded to RGB first. 16-bit, animated, CMYK and damaged files are
//     refused (image_codec.h has the whole list).
#ifndef RETRACE_SERVER_DATA_IMAGE_FOLDER_H_
#define RETRACE_SERVER_DATA_IMAGE_FOLDER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/data/image_set.h"

namespace retrace::data {

// The largest height and width an image (and a model's input) may have.
inline constexpr int64_t kMaxImageSide = 256;

// The shape a model takes, which every image is converted to (see the policy
// above). There is no default shape: a caller passes its model's.
struct ImageSpec {
  int64_t channels = 0;  // 1 (gray) or 3 (RGB)
  int64_t height = 0;    // 1..kMaxImageSide
  int64_t width = 0;     // 1..kMaxImageSide
};

// "3x32x32" (channels x height x width), as error messages write a shape.
std::string ImageSpecText(const ImageSpec& spec);

// OK when `spec` is a shape images can be converted to: 1 or 3 channels,
// height and width in 1..kMaxImageSide. INVALID_ARGUMENT otherwise (also for
// a spec left at its zero default), saying which part is wrong.
absl::Status ValidateImageSpec(const ImageSpec& spec);

// Decodes PNG or JPEG bytes into `spec.channels · height · width` floats in
// [-1, 1], channel-major [C, H, W], converting the channel count as the
// policy above says. `what` names the input at the start of errors (a file
// path, "image" for a request field). INVALID_ARGUMENT when `spec` is
// invalid, the bytes are empty or cannot be decoded, the image's height or
// width differs from `spec` ("image is 28x28 (height x width) with 1 channel
// (gray); the model takes 3x32x32 (channels x height x width) ..."), or it is
// a colour image for a gray spec, or the file breaks image_codec.h's policy.
// Thread-safe.
absl::StatusOr<std::vector<float>> DecodeImage(absl::string_view bytes,
                                               const ImageSpec& spec,
                                               absl::string_view what);

// The inverse: encodes `channels · height · width` floats in [-1, 1],
// channel-major, as an 8-bit PNG of the same channel count (1, 3 or 4;
// values clamped to [-1, 1], NaN as black, each rounded to the nearest byte, so
// pixels that came from bytes encode to those bytes). INVALID_ARGUMENT for
// other channel counts or sizes outside 1..65535.
absl::StatusOr<std::string> EncodePng(const float* pixels, int64_t channels,
                                      int64_t height, int64_t width);

// Reads every image under `root`, each converted to `spec` by DecodeImage.
// Classes are the sub-folders in byte-wise name order, labelled 0, 1, ...;
// images within a class in file-name order, so the result depends only on
// the tree's contents. Files with other extensions and hidden entries are
// ignored. The set has `spec`'s shape, is named "folder:<root>" and records
// class_names and paths. NOT_FOUND when root is missing; INVALID_ARGUMENT for
// an invalid spec, a tree without classes or images, or an image that does
// not decode or convert to `spec` (naming the file).
absl::StatusOr<ImageSet> LoadImageFolder(const std::string& root,
                                         const ImageSpec& spec);

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_IMAGE_FOLDER_H_

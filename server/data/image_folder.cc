#include "server/data/image_folder.h"

#include <stb/stb_image_write.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/data/image_codec.h"

namespace retrace::data {
namespace {

namespace fs = std::filesystem;

bool IsImageFile(const fs::path& path) {
  const std::string ext = absl::AsciiStrToLower(path.extension().string());
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

bool IsHidden(const fs::path& path) {
  const std::string name = path.filename().string();
  return !name.empty() && name[0] == '.';
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  if (in.bad())
    return absl::DataLossError(absl::StrCat("error reading ", path));
  return bytes;
}

// "1 channel (gray)", "4 channels (RGBA)": a file's channels, in words.
std::string ChannelsText(int channels) {
  switch (channels) {
    case 1:
      return "1 channel (gray)";
    case 2:
      return "2 channels (gray + alpha)";
    case 3:
      return "3 channels (RGB)";
    case 4:
      return "4 channels (RGBA)";
    default:
      return absl::StrCat(channels, " channels");
  }
}

void AppendBytes(void* context, void* data, int size) {
  static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                             static_cast<size_t>(size));
}

}  // namespace

std::string ImageSpecText(const ImageSpec& spec) {
  return absl::StrCat(spec.channels, "x", spec.height, "x", spec.width);
}

absl::Status ValidateImageSpec(const ImageSpec& spec) {
  if (spec.channels == 0 && spec.height == 0 && spec.width == 0) {
    return absl::InvalidArgumentError(
        "no image shape was given: images are read into the shape of the "
        "model that takes them ([channels, height, width])");
  }
  if (spec.channels != 1 && spec.channels != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "image shape ", ImageSpecText(spec), " has ", spec.channels,
        " channels; models take 1 (gray) or 3 (RGB)"));
  }
  if (spec.height < 1 || spec.height > kMaxImageSide || spec.width < 1 ||
      spec.width > kMaxImageSide) {
    return absl::InvalidArgumentError(absl::StrCat(
        "image shape ", ImageSpecText(spec), " (channels x height x width) ",
        "is outside the sizes retrace takes: height and width 1..",
        kMaxImageSide));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> DecodeImage(absl::string_view bytes,
                                               const ImageSpec& spec,
                                               absl::string_view what) {
  RETURN_IF_ERROR(ValidateImageSpec(spec));
  // The header alone first: a file of the wrong size is refused before its
  // pixels are allocated or decoded (a small PNG can expand to gigabytes).
  const auto check = [&](const ImageHeader& header) -> absl::Status {
    if (header.width == spec.width && header.height == spec.height) {
      return absl::OkStatus();
    }
    const bool too_large =
        header.width > kMaxImageSide || header.height > kMaxImageSide;
    return absl::InvalidArgumentError(absl::StrCat(
        what, " is ", header.height, "x", header.width,
        " (height x width) with ", ChannelsText(header.channels),
        too_large ? absl::StrCat(", larger than the ", kMaxImageSide, "x",
                                 kMaxImageSide, " retrace takes")
                  : "",
        "; the model takes ", ImageSpecText(spec),
        " (channels x height x width), and images are not resized"));
  };
  ASSIGN_OR_RETURN(const DecodedPixels decoded,
                   DecodePixels(bytes, what, check));
  const int64_t width = decoded.header.width;
  const int channels = decoded.header.channels;
  const uint8_t* pixels = decoded.pixels.data();
  const int64_t plane = width * decoded.header.height;
  // Gray or gray + alpha (1, 2) carry one colour channel, RGB or RGBA (3, 4)
  // three; alpha, when present, is the last channel and is dropped.
  const int colour_channels = channels >= 3 ? 3 : 1;
  if (spec.channels == 1 && colour_channels == 3) {
    for (int64_t p = 0; p < plane; ++p) {
      const uint8_t* px = &pixels[p * channels];
      if (px[0] != px[1] || px[1] != px[2]) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " is a colour image (the pixel at row ", p / width,
            ", column ", p % width, " has R, G, B = ", int{px[0]}, ", ",
            int{px[1]}, ", ", int{px[2]}, "); the model takes gray images (",
            ImageSpecText(spec),
            "), and retrace does not pick a gray formula: convert the image "
            "as the model's training data was converted"));
      }
    }
  }
  std::vector<float> out(static_cast<size_t>(plane * spec.channels));
  for (int64_t c = 0; c < spec.channels; ++c) {
    // A gray file feeds every channel of an RGB model; a colour file that
    // passed the check above has R = G = B, so its R is the gray value.
    const int64_t source = colour_channels == 3 ? c : 0;
    for (int64_t p = 0; p < plane; ++p) {
      out[static_cast<size_t>(c * plane + p)] =
          ByteToPixel(pixels[p * channels + source]);
    }
  }
  return out;
}

absl::StatusOr<ImageSet> LoadImageFolder(const std::string& root,
                                         const ImageSpec& spec) {
  std::error_code error;
  RETURN_IF_ERROR(ValidateImageSpec(spec));
  if (!fs::is_directory(root, error)) {
    return absl::NotFoundError(absl::StrCat(
        "image folder ", root, " does not exist or is not a directory"));
  }
  std::vector<fs::path> class_dirs;
  for (const fs::directory_entry& entry : fs::directory_iterator(root, error)) {
    if (entry.is_directory() && !IsHidden(entry.path())) {
      class_dirs.push_back(entry.path());
    }
  }
  if (error) {
    return absl::NotFoundError(
        absl::StrCat("cannot list image folder ", root, ": ", error.message()));
  }
  std::sort(class_dirs.begin(), class_dirs.end());
  if (class_dirs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "image folder ", root,
        " has no class sub-folders (expected root/<class>/<image>.png)"));
  }
  ImageSet set;
  set.name = absl::StrCat("folder:", root);
  set.channels = spec.channels;
  set.height = spec.height;
  set.width = spec.width;
  for (size_t label = 0; label < class_dirs.size(); ++label) {
    set.class_names.push_back(class_dirs[label].filename().string());
    std::vector<fs::path> files;
    for (const fs::directory_entry& entry :
         fs::directory_iterator(class_dirs[label], error)) {
      if (entry.is_regular_file() && !IsHidden(entry.path()) &&
          IsImageFile(entry.path())) {
        files.push_back(entry.path());
      }
    }
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) {
      absl::StatusOr<std::string> bytes = ReadFile(file.string());
      if (!bytes.ok()) return bytes.status();
      absl::StatusOr<std::vector<float>> pixels =
          DecodeImage(*bytes, spec, file.string());
      if (!pixels.ok()) return pixels.status();
      set.pixels.insert(set.pixels.end(), pixels->begin(), pixels->end());
      set.labels.push_back(static_cast<int32_t>(label));
      set.paths.push_back(file.string());
    }
  }
  if (set.labels.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("image folder ", root,
                     " has no .png/.jpg/.jpeg images in its class "
                     "sub-folders"));
  }
  return set;
}

absl::StatusOr<std::string> EncodePng(const float* pixels, int64_t channels,
                                      int64_t height, int64_t width) {
  if (channels != 1 && channels != 3 && channels != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("PNG thumbnails need 1, 3 or 4 channels, got ", channels));
  }
  if (height <= 0 || width <= 0 || height > 65535 || width > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad thumbnail size ", height, "x", width));
  }
  // stb wants interleaved [H, W, C]; the data is channel-major.
  const int64_t plane = height * width;
  std::vector<uint8_t> interleaved(static_cast<size_t>(plane * channels));
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < plane; ++i) {
      const float v = pixels[c * plane + i];
      const float scaled = std::isfinite(v) ? (v + 1.0f) * 127.5f : 0.0f;
      interleaved[static_cast<size_t>(i * channels + c)] =
          static_cast<uint8_t>(std::clamp(std::lround(scaled), 0l, 255l));
    }
  }
  std::string png;
  if (stbi_write_png_to_func(&AppendBytes, &png, static_cast<int>(width),
                             static_cast<int>(height),
                             static_cast<int>(channels), interleaved.data(),
                             static_cast<int>(width * channels)) == 0) {
    return absl::InternalError("PNG encoding failed");
  }
  return png;
}

}  // namespace retrace::data

#include "server/service/training_images.h"

#include <stb/stb_image_write.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "server/core/status.h"

namespace retrace::service {
namespace {

void AppendBytes(void* context, void* data, int size) {
  static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                             static_cast<size_t>(size));
}

}  // namespace

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

absl::StatusOr<std::unique_ptr<ImageSetTrainingImages>>
ImageSetTrainingImages::Create(data::ImageSet images,
                               const std::vector<int64_t>& sample_ids,
                               const store::StoreReader& store) {
  if (images.size() != store.num_samples() ||
      static_cast<int64_t>(sample_ids.size()) != store.num_samples()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the training images (", images.size(), ") do not match the store (",
        store.num_samples(), " samples)"));
  }
  for (const store::SampleBlock& block : store.shards()) {
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t n = block.first + i;
      if (block.sample_ids[i] != sample_ids[static_cast<size_t>(n)]) {
        return absl::FailedPreconditionError(absl::StrCat(
            "the training images do not match the store: sample ", n,
            " has id ", sample_ids[static_cast<size_t>(n)],
            " in the data and ", block.sample_ids[i], " in the store"));
      }
    }
  }
  return std::unique_ptr<ImageSetTrainingImages>(
      new ImageSetTrainingImages(std::move(images)));
}

absl::StatusOr<std::string> ImageSetTrainingImages::ThumbnailPng(
    int64_t index) const {
  if (index < 0 || index >= images_.size()) {
    return absl::OutOfRangeError(absl::StrCat(
        "sample ", index, " is outside the store (", images_.size(), ")"));
  }
  return EncodePng(images_.Image(index).data(), images_.channels,
                   images_.height, images_.width);
}

std::string ImageSetTrainingImages::LabelName(int32_t label) const {
  if (label < 0 || label >= static_cast<int32_t>(images_.class_names.size())) {
    return "";
  }
  return images_.class_names[static_cast<size_t>(label)];
}

absl::StatusOr<std::unique_ptr<TrainingImages>> LoadTrainingImages(
    const store::StoreReader& store, const data::DataLocations& locations) {
  const nlohmann::json& dataset = store.manifest().spec.dataset;
  const std::string name =
      dataset.contains("name") && dataset["name"].is_string()
          ? dataset["name"].get<std::string>()
          : "";
  absl::StatusOr<data::MixtureSpec> spec = data::ParseMixtureSpec(name);
  if (!spec.ok()) {
    return Annotate(spec.status(),
                    absl::StrCat("the store's dataset.name '", name,
                                 "' is not a mixture spec"));
  }
  if (dataset.contains("seed") && dataset["seed"].is_number_unsigned()) {
    spec->seed = dataset["seed"].get<uint64_t>();
  }
  absl::StatusOr<data::Mixture> mixture = data::BuildMixture(*spec, locations);
  if (!mixture.ok()) {
    return Annotate(mixture.status(),
                    absl::StrCat("reading the training images '", name, "'"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ImageSetTrainingImages> images,
                   ImageSetTrainingImages::Create(std::move(mixture->images),
                                                  mixture->sample_ids, store));
  return std::unique_ptr<TrainingImages>(std::move(images));
}

}  // namespace retrace::service

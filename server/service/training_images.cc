#include "server/service/training_images.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "common/status.h"
#include "server/data/image_folder.h"

namespace retrace::service {
absl::StatusOr<std::unique_ptr<ImageSetTrainingImages>>
ImageSetTrainingImages::Create(data::Mixture mixture,
                               const store::StoreReader& store) {
  const data::ImageSet& images = mixture.images;
  const std::vector<int64_t>& sample_ids = mixture.sample_ids;
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
            " has id ", sample_ids[static_cast<size_t>(n)], " in the data and ",
            block.sample_ids[i], " in the store"));
      }
    }
  }
  return std::unique_ptr<ImageSetTrainingImages>(
      new ImageSetTrainingImages(std::move(mixture)));
}

absl::StatusOr<std::string> ImageSetTrainingImages::ThumbnailPng(
    int64_t index) const {
  const data::ImageSet& images = mixture_.images;
  if (index < 0 || index >= images.size()) {
    return absl::OutOfRangeError(absl::StrCat(
        "sample ", index, " is outside the store (", images.size(), ")"));
  }
  return data::EncodePng(images.Image(index).data(), images.channels,
                         images.height, images.width);
}

std::string ImageSetTrainingImages::LabelName(int64_t index) const {
  if (index < 0 || index >= static_cast<int64_t>(mixture_.provenance.size())) {
    return "";
  }
  const data::SampleProvenance& p =
      mixture_.provenance[static_cast<size_t>(index)];
  const size_t component = static_cast<size_t>(p.component);
  if (component >= mixture_.source_class_names.size()) return "";
  const std::vector<std::string>& names =
      mixture_.source_class_names[component];
  const std::string name =
      p.source_label >= 0 && p.source_label < static_cast<int32_t>(names.size())
          ? names[static_cast<size_t>(p.source_label)]
          : std::to_string(p.source_label);
  // The base component's samples go by their class name; samples mixed in
  // from another source also name it ("mnist: 0"), as they are the ones a
  // reader wants to tell apart (planted outliers).
  if (component == 0 || mixture_.sources[component] == mixture_.sources[0]) {
    return name;
  }
  return absl::StrCat(mixture_.sources[component], ": ", name);
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
  // Image folders of a model description are read in folder order.
  if (dataset.contains("shuffle") && dataset["shuffle"].is_boolean()) {
    spec->shuffle = dataset["shuffle"].get<bool>();
  }
  data::DataLocations where = locations;
  const store::ImageInfo& image = store.manifest().spec.model.image;
  if (image.channels > 0) {
    where.folder_spec = {image.channels, image.height, image.width};
  }
  absl::StatusOr<data::Mixture> mixture = data::BuildMixture(*spec, where);
  if (!mixture.ok()) {
    return Annotate(mixture.status(),
                    absl::StrCat("reading the training images '", name, "'"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ImageSetTrainingImages> images,
                   ImageSetTrainingImages::Create(std::move(*mixture), store));
  return std::unique_ptr<TrainingImages>(std::move(images));
}

}  // namespace retrace::service

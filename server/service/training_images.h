// The training images behind a store, for thumbnails and label names in
// responses. Optional: a server without them answers every request except
// those that ask for thumbnails.
#ifndef RETRACE_SERVER_SERVICE_TRAINING_IMAGES_H_
#define RETRACE_SERVER_SERVICE_TRAINING_IMAGES_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/data/image_set.h"
#include "server/data/mixture.h"
#include "server/store/store_reader.h"

namespace retrace::service {

class TrainingImages {
 public:
  virtual ~TrainingImages() = default;
  // PNG bytes of store sample `index` (8-bit, gray or RGB as the data is).
  // OutOfRange for an index outside the store. Thread-safe.
  virtual absl::StatusOr<std::string> ThumbnailPng(int64_t index) const = 0;
  // What store sample `index` is, for people: its class name in its source
  // ("T-shirt/top"), prefixed with the source for samples mixed in from a
  // source other than the first component's ("mnist: 0"); "" when unknown.
  // Thread-safe.
  virtual std::string LabelName(int64_t index) const = 0;
};

// Training images held in memory, in store order (store index n is image n).
class ImageSetTrainingImages final : public TrainingImages {
 public:
  // Checks that the set matches the store sample by sample (count and sample
  // ids); FailedPrecondition naming the first difference otherwise.
  static absl::StatusOr<std::unique_ptr<ImageSetTrainingImages>> Create(
      data::Mixture mixture, const store::StoreReader& store);

  absl::StatusOr<std::string> ThumbnailPng(int64_t index) const override;
  std::string LabelName(int64_t index) const override;

 private:
  explicit ImageSetTrainingImages(data::Mixture mixture)
      : mixture_(std::move(mixture)) {}
  const data::Mixture mixture_;
};

// Rebuilds the training set that the store names in its manifest
// (dataset.name: a mixture spec; dataset.seed) from `locations`, and checks
// it against the store. Errors of the data readers pass through, annotated.
absl::StatusOr<std::unique_ptr<TrainingImages>> LoadTrainingImages(
    const store::StoreReader& store, const data::DataLocations& locations);

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_TRAINING_IMAGES_H_

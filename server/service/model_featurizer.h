// The query featurizer of retraced: the store's own model (described by a
// model description, server/run/model_description.h: the built-in UNet or a
// TorchScript module, checkpoint by checkpoint) and projection, so
// that a query image gets exactly the features the store was built with
// (the query side of docs/featurization.md).
#ifndef RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_
#define RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/device.h"
#include "server/run/model_description.h"
#include "server/service/query_featurizer.h"
#include "server/store/manifest.h"

namespace retrace::service {

class ModelQueryFeaturizer final : public QueryFeaturizer {
 public:
  // Loads every checkpoint of the model description at `model_path` (a file,
  // or a folder holding model.toml) once per worker. Checks that it
  // describes the store's model: architecture, checkpoint sha256s, image,
  // schedule and loss must equal the manifest's. Query pixels arrive in
  // [−1, 1] and are mapped onto the description's pixel range.
  //   NotFound / DataLoss: missing or changed checkpoint files (naming them).
  //   InvalidArgument: a malformed description (naming the field), a model
  //     file that cannot load or rejects the image shape, workers < 1.
  //   FailedPrecondition: a description other than the store's model;
  //     `device` kCuda without CUDA.
  // `device` (server/model/device.h; kAuto is resolved here) is where every
  // worker's models run; the projection runs on the CPU.
  static absl::StatusOr<std::unique_ptr<ModelQueryFeaturizer>> Create(
      const store::Manifest& manifest, const std::string& model_path,
      int workers, model::DeviceChoice device = model::DeviceChoice::kCpu);
  ~ModelQueryFeaturizer() override;

  std::vector<int64_t> image_shape() const override;
  // Runs on one of the workers' own threads (so that LibTorch allocates on a
  // fixed set of threads, not on every gRPC thread: glibc keeps freed memory
  // per allocating thread's arena, and the resident size crept up over a
  // soak otherwise). Blocks while every worker is busy.
  absl::StatusOr<FeaturizedQuery> Featurize(
      const QueryImage& image, const QueryFeatureOptions& options) override;

 private:
  struct Worker;
  ModelQueryFeaturizer();

  std::vector<int64_t> image_shape_;
  run::ImageDescription image_;
  int64_t dim_ = 0;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mutex_;
  std::condition_variable worker_freed_;
  std::vector<Worker*> free_;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_

// The query featurizer of retraced: the store's own model (the built-in UNet
// of a training run directory, checkpoint by checkpoint) and projection, so
// that a query image gets exactly the features the store was built with
// (DESIGN §1 test side; docs/featurization.md).
#ifndef RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_
#define RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/service/query_featurizer.h"
#include "server/store/manifest.h"

namespace retrace::service {

class ModelQueryFeaturizer final : public QueryFeaturizer {
 public:
  // Loads every checkpoint of the run in `run_dir` once per worker (a UNet
  // is a few MB). Checks that the run is the one the store was built from:
  // the checkpoints' sha256 must equal the manifest's.
  //   NotFound / DataLoss: missing or damaged run files (naming them).
  //   FailedPrecondition: a run other than the store's, or a store whose
  //     model is not the built-in UNet.
  //   InvalidArgument: workers < 1.
  static absl::StatusOr<std::unique_ptr<ModelQueryFeaturizer>> Create(
      const store::Manifest& manifest, const std::string& run_dir, int workers);
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
  int64_t dim_ = 0;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mutex_;
  std::condition_variable worker_freed_;
  std::vector<Worker*> free_;
};

}  // namespace retrace::service

#endif  // RETRACE_SERVER_SERVICE_MODEL_FEATURIZER_H_

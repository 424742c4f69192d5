#include "server/service/model_featurizer.h"

#include <torch/torch.h>

#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/featurize/featurizer.h"
#include "server/model/schedule.h"
#include "server/model/torch_status.h"
#include "server/run/model_description.h"

namespace retrace::service {

// A worker owns one model and featurizer per checkpoint and the thread that
// runs them; Run hands it one job at a time (the pool in Featurize makes sure
// a worker is never given two).
struct ModelQueryFeaturizer::Worker {
  std::vector<std::unique_ptr<model::DiffusionModel>> models;  // index c
  std::vector<std::unique_ptr<featurize::Featurizer>> featurizers;

  Worker() : thread([this] { Loop(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    changed.notify_all();
    thread.join();
  }

  // Runs `job` on the worker's thread and waits for it.
  void Run(std::function<void()> job) {
    std::unique_lock<std::mutex> lock(mutex);
    pending = std::move(job);
    changed.notify_all();
    changed.wait(lock, [&] { return !pending; });
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (true) {
      changed.wait(lock, [&] { return stopping || pending; });
      if (stopping) return;
      lock.unlock();
      pending();
      lock.lock();
      pending = nullptr;
      changed.notify_all();
    }
  }

  std::mutex mutex;
  std::condition_variable changed;
  std::function<void()> pending;
  bool stopping = false;
  std::thread thread;  // last: starts once the members above exist
};

ModelQueryFeaturizer::ModelQueryFeaturizer() = default;
ModelQueryFeaturizer::~ModelQueryFeaturizer() = default;

absl::StatusOr<std::unique_ptr<ModelQueryFeaturizer>>
ModelQueryFeaturizer::Create(const store::Manifest& manifest,
                             const std::string& model_path, int workers,
                             model::DeviceChoice device) {
  if (workers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("featurizer workers must be >= 1, got ", workers));
  }
  ASSIGN_OR_RETURN(device, model::ResolveDevice(device));
  const store::StoreSpec& spec = manifest.spec;
  ASSIGN_OR_RETURN(const run::ModelDescription description,
                   run::LoadModelDescription(model_path,
                                             /*verify_checksums=*/true));
  RETURN_IF_ERROR(run::CheckMatchesStore(description, spec));
  if (!spec.dataset.contains("store_seed") ||
      !spec.dataset["store_seed"].is_number_unsigned()) {
    return absl::FailedPreconditionError(
        "the store's manifest has no dataset.store_seed");
  }

  ASSIGN_OR_RETURN(const model::NoiseSchedule schedule,
                   run::CreateNoiseSchedule(description.schedule));
  featurize::FeaturizeSpec fspec;
  fspec.bucket_edges = spec.buckets.edges;
  fspec.grad_timesteps = spec.grad_timesteps;
  fspec.store_seed = spec.dataset["store_seed"].get<uint64_t>();
  fspec.projection.type = spec.projection.type;
  fspec.projection.output_dim = spec.projection.dim;
  fspec.projection.sparsity = spec.projection.sparsity;
  fspec.projection.seed = spec.projection.seed;
  fspec.projection.input_dim = spec.projection.input_dim;
  fspec.param_regex = spec.projection.param_regex;
  ASSIGN_OR_RETURN(fspec.loss, run::LossTypeOf(description));

  std::unique_ptr<ModelQueryFeaturizer> f(new ModelQueryFeaturizer());
  f->image_shape_ = {description.image.channels, description.image.height,
                     description.image.width};
  f->image_ = description.image;
  f->dim_ = spec.projection.dim;
  for (int w = 0; w < workers; ++w) {
    auto worker = std::make_unique<Worker>();
    for (size_t c = 0; c < description.checkpoints.size(); ++c) {
      ASSIGN_OR_RETURN(std::unique_ptr<model::DiffusionModel> net,
                       run::LoadCheckpointModel(description, int64_t(c)));
      RETURN_IF_ERROR(model::MoveModelTo(*net, device));
      ASSIGN_OR_RETURN(
          std::unique_ptr<featurize::Featurizer> featurizer,
          featurize::Featurizer::Create(net.get(), schedule, fspec));
      worker->models.push_back(std::move(net));
      worker->featurizers.push_back(std::move(featurizer));
    }
    f->free_.push_back(worker.get());
    f->workers_.push_back(std::move(worker));
  }
  return f;
}

std::vector<int64_t> ModelQueryFeaturizer::image_shape() const {
  return image_shape_;
}

absl::StatusOr<FeaturizedQuery> ModelQueryFeaturizer::Featurize(
    const QueryImage& image, const QueryFeatureOptions& options) {
  if (std::vector<int64_t>{image.channels, image.height, image.width} !=
          image_shape_ ||
      static_cast<int64_t>(image.pixels.size()) !=
          image.channels * image.height * image.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query image of shape [", image.channels, ", ", image.height, ", ",
        image.width, "]; the model takes [", image_shape_[0], ", ",
        image_shape_[1], ", ", image_shape_[2], "]"));
  }
  Worker* worker = nullptr;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    worker_freed_.wait(lock, [&] { return !free_.empty(); });
    worker = free_.back();
    free_.pop_back();
  }
  auto run = [&]() -> absl::StatusOr<FeaturizedQuery> {
    return model::internal::CallTorch(
        "featurizing the query", [&]() -> absl::StatusOr<FeaturizedQuery> {
          at::Tensor pixels =
              torch::from_blob(const_cast<float*>(image.pixels.data()),
                               {image.channels, image.height, image.width},
                               torch::kFloat32)
                  .clone();
          run::ToModelRange(image_, pixels.data_ptr<float>(), pixels.numel());
          featurize::QueryOptions q;
          q.query_timesteps = options.query_timesteps;
          q.noise_draws = options.noise_draws;
          q.seed = options.seed;
          const int64_t num_c =
              static_cast<int64_t>(worker->featurizers.size());
          FeaturizedQuery out;
          for (int64_t c = 0; c < num_c; ++c) {
            ASSIGN_OR_RETURN(
                featurize::QueryFeatures features,
                worker->featurizers[static_cast<size_t>(c)]->QuerySide(pixels,
                                                                       c, q));
            const at::Tensor raw = features.raw.contiguous();
            const at::Tensor unit = features.unit.contiguous();
            out.vectors.raw.insert(out.vectors.raw.end(), raw.data_ptr<float>(),
                                   raw.data_ptr<float>() + raw.numel());
            out.vectors.unit.insert(out.vectors.unit.end(),
                                    unit.data_ptr<float>(),
                                    unit.data_ptr<float>() + unit.numel());
            out.project_seconds += features.project_seconds;
          }
          return out;
        });
  };
  absl::StatusOr<FeaturizedQuery> result =
      absl::InternalError("the featurizer worker did not run");
  worker->Run([&] { result = run(); });
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(worker);
  }
  worker_freed_.notify_one();
  return result;
}

}  // namespace retrace::service

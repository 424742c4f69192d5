#include "server/featurize/group_gradients.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "server/featurize/unet_mirror.h"
#include "server/model/diffusion.h"
#include "server/model/torch_status.h"
#include "server/model/unet.h"

namespace retrace::featurize {

const char* GradientMethodName(GradientMethod method) {
  switch (method) {
    case GradientMethod::kAuto:
      return "auto";
    case GradientMethod::kLayerwise:
      return "layerwise";
    case GradientMethod::kLoop:
      return "loop";
    case GradientMethod::kParallel:
      return "parallel";
  }
  return "unknown";
}

namespace internal {
namespace {

using model::internal::CallTorch;

// The mirror must reproduce the model to float rounding; in practice it is
// bit-identical (same operators, same order).
constexpr double kMirrorCheckRelTol = 1e-5;

absl::Status CheckRows(const at::Tensor& x, const at::Tensor& t,
                       const at::Tensor& eps, int64_t group_size) {
  if (!x.defined() || x.dim() != 4 || x.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        "group gradients: x must be float32 [N, C, H, W]");
  }
  if (!eps.defined() || !eps.sizes().equals(x.sizes()) ||
      eps.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        "group gradients: eps must be float32 with the shape of x");
  }
  if (!t.defined() || t.dim() != 1 || t.size(0) != x.size(0) ||
      t.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError(
        absl::StrCat("group gradients: t must be int64 [", x.size(0), "]"));
  }
  if (group_size < 1 || x.size(0) == 0 || x.size(0) % group_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group gradients: ", x.size(0),
                     " rows do not split into groups of ", group_size));
  }
  return absl::OkStatus();
}

std::vector<at::Tensor> SelectedTensors(const model::DiffusionModel& model,
                                        const std::vector<int>& selected) {
  std::vector<model::NamedParameter> params = model.NamedParameters();
  std::vector<at::Tensor> out;
  out.reserve(selected.size());
  for (int i : selected) out.push_back(params[i].tensor);
  return out;
}

// Per-group weight gradients of a convolution, [G, C_out, C_in, K, K]:
// the weight gradient of one grouped convolution with G groups, whose
// group g convolves the k rows of group g (stacked along the batch axis, over
// which the weight gradient sums). One oneDNN call runs as fast as the
// ordinary summed weight gradient, where unfold + bmm was about ten times
// slower on the CPU.
at::Tensor ConvGroupWeightGradients(const MirrorLayer& layer,
                                    const at::Tensor& input,
                                    const at::Tensor& go, int64_t k) {
  const int64_t n = input.size(0), groups = n / k;
  const int64_t c_in = input.size(1), c_out = go.size(1);
  // [G·k, C, H, W] -> [k, G·C, H, W]: row j of every group in one batch item.
  auto stack = [&](const at::Tensor& t) {
    return k == 1 ? t.reshape({1, n * t.size(1), t.size(2), t.size(3)})
                  : t.reshape({groups, k, t.size(1), t.size(2), t.size(3)})
                        .transpose(0, 1)
                        .reshape({k, groups * t.size(1), t.size(2), t.size(3)});
  };
  // Only the weight's shape matters for the weight gradient.
  const at::Tensor weight_shape = at::empty(
      {groups * c_out, c_in, layer.kernel, layer.kernel}, input.options());
  at::Tensor dw = std::get<1>(at::convolution_backward(
      stack(go), stack(input), weight_shape, /*bias_sizes=*/c10::nullopt,
      {layer.stride, layer.stride}, {layer.padding, layer.padding}, {1, 1},
      /*transposed=*/false, {0, 0}, groups, {false, true, false}));
  return dw.reshape({groups, c_out, c_in, layer.kernel, layer.kernel});
}

// G_g for the groups g in [begin, end), one forward and backward pass each
// through `model`, written to row g − begin of out[i] (one tensor per entry
// of `params`, the model's selected parameters).
absl::Status LoopGroups(model::DiffusionModel& model,
                        const std::vector<at::Tensor>& params,
                        const model::NoiseSchedule& schedule,
                        model::LossType loss, const at::Tensor& x,
                        const at::Tensor& t, const at::Tensor& eps, int64_t k,
                        int64_t begin, int64_t end,
                        const std::vector<at::Tensor>& out) {
  at::AutoGradMode grad_mode(true);
  for (int64_t g = begin; g < end; ++g) {
    const at::Tensor xs = x.narrow(0, g * k, k);
    const at::Tensor ts = t.narrow(0, g * k, k);
    const at::Tensor es = eps.narrow(0, g * k, k);
    ASSIGN_OR_RETURN(at::Tensor per,
                     model::DiffusionLoss(model, schedule, loss, xs, ts, es));
    at::Tensor total = per.sum() * (1.0 / static_cast<double>(k));
    std::vector<at::Tensor> grads = torch::autograd::grad(
        {total}, params, /*grad_outputs=*/{}, /*retain_graph=*/false,
        /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < params.size(); ++i) {
      if (grads[i].defined()) {
        out[i][g - begin].copy_(grads[i].reshape({-1}));
      } else {
        out[i][g - begin].zero_();
      }
    }
  }
  return absl::OkStatus();
}

std::vector<at::Tensor> EmptyGroupGradients(
    const std::vector<at::Tensor>& params, int64_t groups) {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const at::Tensor& p : params) {
    out.push_back(at::empty({groups, p.numel()}, p.options()));
  }
  return out;
}

class LoopEngine final : public GroupGradientEngine {
 public:
  LoopEngine(model::DiffusionModel* model, const model::NoiseSchedule& schedule,
             model::LossType loss, std::vector<int> selected)
      : model_(model),
        schedule_(schedule),
        loss_(loss),
        selected_(std::move(selected)) {}

  GradientMethod method() const override { return GradientMethod::kLoop; }

  absl::StatusOr<std::vector<at::Tensor>> Compute(const at::Tensor& x,
                                                  const at::Tensor& t,
                                                  const at::Tensor& eps,
                                                  int64_t k) override {
    RETURN_IF_ERROR(CheckRows(x, t, eps, k));
    const int64_t groups = x.size(0) / k;
    return CallTorch(
        "loop gradients", [&]() -> absl::StatusOr<std::vector<at::Tensor>> {
          // Fetched per call: a model's Load may replace its tensors.
          const std::vector<at::Tensor> params =
              SelectedTensors(*model_, selected_);
          std::vector<at::Tensor> out = EmptyGroupGradients(params, groups);
          RETURN_IF_ERROR(LoopGroups(*model_, params, schedule_, loss_, x, t,
                                     eps, k, 0, groups, out));
          return out;
        });
  }

 private:
  model::DiffusionModel* model_;
  model::NoiseSchedule schedule_;
  model::LossType loss_;
  std::vector<int> selected_;
};

// ---- kParallel ----

// The thread-count setters, looked up at run time: LibTorch links libgomp
// and OpenBLAS but retrace does not link them itself (and another BLAS may
// stand in for OpenBLAS). A missing symbol leaves that setting alone.
struct ThreadControls {
  void (*omp_set_num_threads)(int) = nullptr;
  int (*openblas_get_num_threads)() = nullptr;
  void (*openblas_set_num_threads)(int) = nullptr;

  ThreadControls() {
    omp_set_num_threads = reinterpret_cast<void (*)(int)>(
        dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    openblas_get_num_threads = reinterpret_cast<int (*)()>(
        dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    openblas_set_num_threads = reinterpret_cast<void (*)(int)>(
        dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  }
};

const ThreadControls& Controls() {
  static const ThreadControls* controls = new ThreadControls();
  return *controls;
}

// Gives the calling thread one OpenMP thread, and with it one intra-op
// thread for ATen and oneDNN. at::get_num_threads() first runs LibTorch's
// lazy per-thread initialisation, which would otherwise reset the count to
// the process default at the thread's first parallel region.
void UseOneIntraOpThread() {
  (void)at::get_num_threads();
  if (Controls().omp_set_num_threads != nullptr) {
    Controls().omp_set_num_threads(1);
  }
}

// OpenBLAS's thread count is process-wide: 1 from the first of overlapping
// holders' construction to the last one's destruction, then restored. The
// only process-wide state of this library, mirroring OpenBLAS's own.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    std::lock_guard<std::mutex> lock(Mutex());
    const ThreadControls& c = Controls();
    if (Holders()++ == 0 && c.openblas_get_num_threads != nullptr &&
        c.openblas_set_num_threads != nullptr) {
      Saved() = c.openblas_get_num_threads();
      c.openblas_set_num_threads(1);
    }
  }
  ~SingleThreadedBlas() {
    std::lock_guard<std::mutex> lock(Mutex());
    const ThreadControls& c = Controls();
    if (--Holders() == 0 && c.openblas_set_num_threads != nullptr &&
        Saved() > 0) {
      c.openblas_set_num_threads(Saved());
    }
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  static std::mutex& Mutex() {
    static std::mutex* mutex = new std::mutex();
    return *mutex;
  }
  static int& Holders() {
    static int holders = 0;
    return holders;
  }
  static int& Saved() {
    static int saved = 0;
    return saved;
  }
};

// W threads that each run their share of a Run and sleep in between. Each
// thread keeps one intra-op thread (UseOneIntraOpThread) for its lifetime.
class WorkerThreads {
 public:
  explicit WorkerThreads(int count) {
    for (int w = 0; w < count; ++w)
      threads_.emplace_back([this, w] { Loop(w); });
  }
  ~WorkerThreads() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    for (std::thread& thread : threads_) thread.join();
  }
  WorkerThreads(const WorkerThreads&) = delete;
  WorkerThreads& operator=(const WorkerThreads&) = delete;

  int size() const { return static_cast<int>(threads_.size()); }

  // Runs jobs[w] on thread w (jobs.size() <= size()) and returns when all
  // have finished. One Run at a time.
  void Run(std::vector<std::function<void()>> jobs) {
    std::unique_lock<std::mutex> lock(mutex_);
    jobs_ = std::move(jobs);
    unfinished_ = static_cast<int>(jobs_.size());
    ++generation_;
    changed_.notify_all();
    changed_.wait(lock, [&] { return unfinished_ == 0; });
    jobs_.clear();
  }

 private:
  void Loop(int w) {
    UseOneIntraOpThread();
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      changed_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      if (w >= static_cast<int>(jobs_.size())) continue;
      std::function<void()>& job = jobs_[w];
      lock.unlock();
      // Again per job: LibTorch code may re-run its thread initialisation.
      UseOneIntraOpThread();
      job();
      lock.lock();
      if (--unfinished_ == 0) changed_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::function<void()>> jobs_;
  uint64_t generation_ = 0;
  int unfinished_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;  // last: start once the above exist
};

class ParallelEngine final : public GroupGradientEngine {
 public:
  static absl::StatusOr<std::unique_ptr<GroupGradientEngine>> Create(
      model::DiffusionModel* model, const model::NoiseSchedule& schedule,
      model::LossType loss, std::vector<int> selected, int workers) {
    std::vector<std::unique_ptr<model::DiffusionModel>> replicas;
    const std::vector<model::NamedParameter> params = model->NamedParameters();
    for (int w = 0; w < workers; ++w) {
      absl::StatusOr<std::unique_ptr<model::DiffusionModel>> replica =
          model->Clone();
      if (!replica.ok()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "parallel per-sample gradients need replicas of the model: ",
            replica.status().message()));
      }
      const std::vector<model::NamedParameter> copy =
          (*replica)->NamedParameters();
      bool same = copy.size() == params.size();
      for (size_t i = 0; same && i < copy.size(); ++i) {
        same = copy[i].name == params[i].name &&
               copy[i].tensor.sizes().equals(params[i].tensor.sizes());
      }
      if (!same) {
        return absl::InternalError(
            "parallel per-sample gradients: a replica's parameters differ "
            "from the model's in names or shapes");
      }
      replicas.push_back(*std::move(replica));
    }
    return std::unique_ptr<GroupGradientEngine>(new ParallelEngine(
        model, schedule, loss, std::move(selected), std::move(replicas)));
  }

  GradientMethod method() const override { return GradientMethod::kParallel; }
  int workers() const override { return threads_.size(); }

  absl::StatusOr<std::vector<at::Tensor>> Compute(const at::Tensor& x,
                                                  const at::Tensor& t,
                                                  const at::Tensor& eps,
                                                  int64_t k) override {
    RETURN_IF_ERROR(CheckRows(x, t, eps, k));
    const int64_t groups = x.size(0) / k;
    const int active =
        static_cast<int>(std::min<int64_t>(threads_.size(), groups));
    std::vector<at::Tensor> source, out;
    std::vector<std::vector<at::Tensor>> shares(active);
    RETURN_IF_ERROR(CallTorch("parallel gradients", [&]() -> absl::Status {
      // Fetched per call: the original's Load may replace its tensors.
      for (const model::NamedParameter& p : model_->NamedParameters()) {
        source.push_back(p.tensor);
      }
      out = EmptyGroupGradients(SelectedTensors(*model_, selected_), groups);
      for (int w = 0; w < active; ++w) {
        for (const at::Tensor& o : out) {
          shares[w].push_back(o.narrow(
              0, Begin(w, active, groups),
              Begin(w + 1, active, groups) - Begin(w, active, groups)));
        }
      }
      return absl::OkStatus();
    }));
    std::vector<absl::Status> results(active);
    std::vector<std::function<void()>> jobs;
    for (int w = 0; w < active; ++w) {
      jobs.push_back([&, w] {
        results[w] = CallTorch(
            absl::StrCat("parallel gradients, worker ", w),
            [&]() -> absl::Status {
              model::DiffusionModel& replica = *replicas_[w];
              {
                at::NoGradGuard no_grad;
                std::vector<model::NamedParameter> mine =
                    replica.NamedParameters();
                for (size_t i = 0; i < mine.size(); ++i) {
                  mine[i].tensor.copy_(source[i]);
                }
              }
              return LoopGroups(replica, SelectedTensors(replica, selected_),
                                schedule_, loss_, x, t, eps, k,
                                Begin(w, active, groups),
                                Begin(w + 1, active, groups), shares[w]);
            });
      });
    }
    {
      SingleThreadedBlas blas;
      threads_.Run(std::move(jobs));
    }
    for (const absl::Status& status : results) RETURN_IF_ERROR(status);
    return out;
  }

 private:
  ParallelEngine(model::DiffusionModel* model,
                 const model::NoiseSchedule& schedule, model::LossType loss,
                 std::vector<int> selected,
                 std::vector<std::unique_ptr<model::DiffusionModel>> replicas)
      : model_(model),
        schedule_(schedule),
        loss_(loss),
        selected_(std::move(selected)),
        replicas_(std::move(replicas)),
        threads_(static_cast<int>(replicas_.size())) {}

  // First group of worker w's share: shares differ by at most one group.
  static int64_t Begin(int w, int workers, int64_t groups) {
    return groups * w / workers;
  }

  model::DiffusionModel* model_;
  model::NoiseSchedule schedule_;
  model::LossType loss_;
  std::vector<int> selected_;
  std::vector<std::unique_ptr<model::DiffusionModel>> replicas_;
  WorkerThreads threads_;  // last: joined before the replicas go
};

class LayerwiseEngine final : public GroupGradientEngine {
 public:
  LayerwiseEngine(UNetMirror mirror, const model::NoiseSchedule& schedule,
                  model::LossType loss, const std::vector<int>& selected,
                  int num_params)
      : mirror_(std::move(mirror)),
        schedule_(schedule),
        loss_(loss),
        position_(num_params, -1) {
    for (size_t i = 0; i < selected.size(); ++i) position_[selected[i]] = i;
    for (const MirrorLayer& layer : mirror_.layers()) {
      tap_layer_.push_back(position_[layer.weight_index] >= 0 ||
                           position_[layer.bias_index] >= 0);
    }
    num_selected_ = selected.size();
  }

  GradientMethod method() const override { return GradientMethod::kLayerwise; }

  absl::StatusOr<std::vector<at::Tensor>> Compute(const at::Tensor& x,
                                                  const at::Tensor& t,
                                                  const at::Tensor& eps,
                                                  int64_t k) override {
    RETURN_IF_ERROR(CheckRows(x, t, eps, k));
    return CallTorch(
        "layerwise gradients",
        [&]() -> absl::StatusOr<std::vector<at::Tensor>> {
          at::AutoGradMode grad_mode(true);
          ASSIGN_OR_RETURN(at::Tensor x_t,
                           model::AddNoise(schedule_, x, t, eps));
          std::vector<LayerTap> taps;
          at::Tensor eps_hat = mirror_.Forward(x_t, t, &tap_layer_, &taps);
          ASSIGN_OR_RETURN(at::Tensor per,
                           model::PerExampleLoss(eps, eps_hat, loss_));
          at::Tensor total = per.sum() * (1.0 / static_cast<double>(k));
          std::vector<at::Tensor> outputs;
          outputs.reserve(taps.size());
          for (const LayerTap& tap : taps) outputs.push_back(tap.output);
          std::vector<at::Tensor> grad_outputs = torch::autograd::grad(
              {total}, outputs, /*grad_outputs=*/{}, /*retain_graph=*/false,
              /*create_graph=*/false, /*allow_unused=*/true);
          at::NoGradGuard no_grad;
          std::vector<at::Tensor> out(num_selected_);
          for (size_t i = 0; i < taps.size(); ++i) {
            LayerGradients(taps[i], grad_outputs[i], k, &out);
          }
          return out;
        });
  }

 private:
  // Writes the group gradients of one layer's selected weight and bias.
  void LayerGradients(const LayerTap& tap, at::Tensor go, int64_t k,
                      std::vector<at::Tensor>* out) const {
    const MirrorLayer& layer = mirror_.layers()[tap.layer];
    const int64_t n = tap.output.size(0);
    const int64_t groups = n / k;
    if (!go.defined()) go = at::zeros_like(tap.output);
    const int weight_pos = position_[layer.weight_index];
    const int bias_pos = position_[layer.bias_index];
    at::Tensor dw, db;
    switch (layer.kind) {
      case LayerKind::kLinear: {
        const int64_t out_f = go.size(1), in_f = tap.input.size(1);
        if (weight_pos >= 0) {
          dw = at::bmm(go.reshape({groups, k, out_f}).transpose(1, 2),
                       tap.input.reshape({groups, k, in_f}));
        }
        if (bias_pos >= 0) db = go.reshape({groups, k, out_f}).sum(1);
        break;
      }
      case LayerKind::kConv2d: {
        const int64_t c_out = go.size(1);
        if (weight_pos >= 0)
          dw = ConvGroupWeightGradients(layer, tap.input, go, k);
        if (bias_pos >= 0) {
          db = go.sum({2, 3}).reshape({groups, k, c_out}).sum(1);
        }
        break;
      }
      case LayerKind::kGroupNorm: {
        const int64_t c = go.size(1);
        if (weight_pos >= 0) {
          dw = (go * tap.input).sum({2, 3}).reshape({groups, k, c}).sum(1);
        }
        if (bias_pos >= 0) db = go.sum({2, 3}).reshape({groups, k, c}).sum(1);
        break;
      }
    }
    if (weight_pos >= 0) {
      (*out)[weight_pos] = dw.reshape({groups, -1}).contiguous();
    }
    if (bias_pos >= 0) (*out)[bias_pos] = db.reshape({groups, -1}).contiguous();
  }

  UNetMirror mirror_;
  model::NoiseSchedule schedule_;
  model::LossType loss_;
  std::vector<int> position_;  // model parameter index -> selected position
  std::vector<bool> tap_layer_;
  size_t num_selected_ = 0;
};

// Runs the mirror and the model on a fixed small batch and compares.
absl::Status CheckMirror(model::DiffusionModel* model,
                         const UNetMirror& mirror) {
  const model::ImageShape shape = model->InputShape();
  return CallTorch("unet mirror check", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    const int64_t numel = 2 * shape.channels * shape.height * shape.width;
    const at::Device device = model->device();
    at::Tensor x = at::sin(at::arange(numel, at::kFloat) * 0.37)
                       .reshape({2, shape.channels, shape.height, shape.width})
                       .to(device);
    at::Tensor t =
        at::tensor(std::vector<int64_t>{3, 701}, at::kLong).to(device);
    ASSIGN_OR_RETURN(at::Tensor expected, model->Forward(x, t));
    at::Tensor got = mirror.Forward(x, t, nullptr, nullptr);
    const double diff = (got - expected).abs().max().item<double>();
    const double scale = expected.abs().max().item<double>();
    if (!(diff <= kMirrorCheckRelTol * std::max(1.0, scale))) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layerwise UNet mirror differs from the model's forward pass "
          "(max |diff| ",
          diff,
          "); server/model/unet.cc has changed without "
          "server/featurize/unet_mirror.cc"));
    }
    return absl::OkStatus();
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<GroupGradientEngine>> CreateGroupGradientEngine(
    model::DiffusionModel* model, const model::NoiseSchedule& schedule,
    model::LossType loss, std::vector<int> selected, GradientMethod method,
    int workers) {
  if (model == nullptr) {
    return absl::InvalidArgumentError("group gradients: model is null");
  }
  const std::vector<model::NamedParameter> params = model->NamedParameters();
  for (size_t i = 0; i < selected.size(); ++i) {
    if (selected[i] < 0 || selected[i] >= static_cast<int>(params.size()) ||
        (i > 0 && selected[i] <= selected[i - 1])) {
      return absl::InvalidArgumentError(
          "group gradients: selected parameter indices must increase and lie "
          "inside the model's parameter list");
    }
  }
  if (workers < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group gradients: workers must be >= 0 (0: one per hardware thread), "
        "got ",
        workers));
  }
  if (workers == 0) {
    workers =
        std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }
  // Replicas on one GPU would only queue their kernels on the same device;
  // there the batched layerwise pass (or the loop's per-group batches) is
  // the way to use it.
  const bool on_cpu = model->device().is_cpu();
  if (method == GradientMethod::kParallel) {
    if (!on_cpu) {
      return absl::FailedPreconditionError(absl::StrCat(
          "parallel per-sample gradients run on the CPU only; the model is on ",
          model->device().str(), " (use layerwise or loop)"));
    }
    return ParallelEngine::Create(model, schedule, loss, std::move(selected),
                                  workers);
  }
  if (method != GradientMethod::kLoop) {
    auto* unet = dynamic_cast<model::UNetModel*>(model);
    absl::Status why = absl::FailedPreconditionError(absl::StrCat(
        "layerwise per-sample gradients support the built-in UNet only, not ",
        model->Architecture()));
    if (unet != nullptr) {
      absl::StatusOr<UNetMirror> mirror =
          UNetMirror::Create(unet->config(), params);
      why = mirror.ok() ? CheckMirror(model, *mirror) : mirror.status();
      if (why.ok()) {
        return std::unique_ptr<GroupGradientEngine>(
            std::make_unique<LayerwiseEngine>(*std::move(mirror), schedule,
                                              loss, selected,
                                              static_cast<int>(params.size())));
      }
    }
    if (method == GradientMethod::kLayerwise) return why;
    if (workers > 1 && on_cpu) {
      absl::StatusOr<std::unique_ptr<GroupGradientEngine>> parallel =
          ParallelEngine::Create(model, schedule, loss, selected, workers);
      if (parallel.ok() || !absl::IsFailedPrecondition(parallel.status())) {
        return parallel;
      }
    }
  }
  return std::unique_ptr<GroupGradientEngine>(
      std::make_unique<LoopEngine>(model, schedule, loss, std::move(selected)));
}

}  // namespace internal
}  // namespace retrace::featurize

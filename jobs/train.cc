// The only translation unit of retrace_jobs that includes LibTorch.
#include "jobs/train.h"

#include <ATen/Parallel.h>
#include <torch/optim/adam.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "jobs/batch_order.h"
#include "jobs/progress.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "common/status.h"
#include "server/model/device.h"
#include "server/model/diffusion.h"
#include "server/model/replay.h"
#include "server/model/torch_status.h"
#include "server/model/unet.h"

namespace retrace::jobs {
namespace {

using model::internal::CallTorch;

// Keys inside train-state.pt.
constexpr char kStateStepKey[] = "step";
constexpr char kStateIdentityKey[] = "run_identity";
constexpr char kStateModelKey[] = "model";
constexpr char kStateOptimizerKey[] = "optimizer";

std::string PathIn(const std::string& dir, absl::string_view name) {
  return absl::StrCat(dir, "/", name);
}

// Everything one training call works with.
struct TrainingCall {
  const TrainConfig& config;
  const TrainOptions& options;
  const data::ImageSet& images;
  std::vector<int64_t> sample_ids;
  RunManifest manifest;
  std::string identity;  // RunIdentityDigest(manifest)
  std::unique_ptr<model::UNetModel> net;
  std::unique_ptr<torch::optim::Adam> optimizer;
  std::vector<float> losses;  // losses[s] = mean batch loss of step s
};

absl::Status SaveTrainState(TrainingCall& s, int64_t steps_done) {
  const std::string path = PathIn(s.options.run_dir, kTrainStateFile);
  const std::string temp_path = path + kTempSuffix;
  RETURN_IF_ERROR(
      CallTorch(absl::StrCat("writing ", temp_path), [&]() -> absl::Status {
        torch::serialize::OutputArchive archive;
        archive.write(kStateStepKey, torch::tensor({steps_done}, torch::kLong));
        archive.write(kStateIdentityKey, c10::IValue(s.identity));
        torch::serialize::OutputArchive weights;
        for (const model::NamedParameter& p : s.net->NamedParameters()) {
          weights.write(p.name, p.tensor.detach().to(torch::kCPU));
        }
        archive.write(kStateModelKey, weights);
        torch::serialize::OutputArchive optimizer;
        s.optimizer->save(optimizer);
        archive.write(kStateOptimizerKey, optimizer);
        archive.save_to(temp_path);
        return absl::OkStatus();
      }));
  return CommitFile(s.options.env, temp_path, path);
}

// Restores weights and Adam state; returns the step the state was saved at.
absl::StatusOr<int64_t> LoadTrainState(TrainingCall& s,
                                       const std::string& path) {
  return CallTorch(
      absl::StrCat("reading ", path), [&]() -> absl::StatusOr<int64_t> {
        torch::serialize::InputArchive archive;
        // Onto the model's device: the Adam moments were saved from
        // whichever device the run was on.
        archive.load_from(path, s.net->device());
        c10::IValue identity;
        torch::Tensor step;
        if (!archive.try_read(kStateIdentityKey, identity) ||
            !identity.isString() || !archive.try_read(kStateStepKey, step) ||
            step.numel() != 1) {
          return absl::DataLossError(
              absl::StrCat(path, " is not a retrace training state"));
        }
        if (identity.toStringRef() != s.identity) {
          return absl::FailedPreconditionError(absl::StrCat(
              path,
              " was saved by a different training run than the one "
              "described in run.json"));
        }
        const int64_t steps_done = step.item<int64_t>();
        if (steps_done < 0 || steps_done > s.config.steps) {
          return absl::DataLossError(absl::StrCat(path, ": step ", steps_done,
                                                  " is outside [0, ",
                                                  s.config.steps, "]"));
        }
        torch::serialize::InputArchive weights;
        if (!archive.try_read(kStateModelKey, weights)) {
          return absl::DataLossError(absl::StrCat(path, " lacks the weights"));
        }
        torch::NoGradGuard no_grad;
        for (const model::NamedParameter& p : s.net->NamedParameters()) {
          torch::Tensor value;
          if (!weights.try_read(p.name, value) ||
              !value.sizes().equals(p.tensor.sizes()) ||
              value.scalar_type() != p.tensor.scalar_type()) {
            return absl::DataLossError(absl::StrCat(
                path, ": parameter ", p.name, " is missing or mis-shaped"));
          }
          p.tensor.copy_(value);
        }
        torch::serialize::InputArchive optimizer;
        if (!archive.try_read(kStateOptimizerKey, optimizer)) {
          return absl::DataLossError(
              absl::StrCat(path, " lacks the optimizer state"));
        }
        s.optimizer->load(optimizer);
        return steps_done;
      });
}

absl::StatusOr<CheckpointInfo> DescribeCheckpoint(const TrainingCall& s,
                                                  int64_t step) {
  CheckpointInfo info;
  info.file = CheckpointFileName(step);
  info.step = step;
  info.weight = CheckpointWeight(s.config, step);
  ASSIGN_OR_RETURN(info.sha256,
                   Sha256File(PathIn(s.options.run_dir, info.file)));
  return info;
}

// The replay log of the checkpoints at `steps` (a function of the run's
// seed, data and those steps); sets the manifest's replay_sha256 to it.
absl::StatusOr<std::string> ReplayLogBytes(TrainingCall& s,
                                           const std::vector<int64_t>& steps) {
  ASSIGN_OR_RETURN(BatchOrder order,
                   BatchOrder::Create(s.config.run_seed, s.images.size(),
                                      s.config.batch_size));
  ASSIGN_OR_RETURN(model::ReplayLog log,
                   BuildReplayLog(s.config.run_seed, s.config.num_timesteps,
                                  order, steps, s.sample_ids));
  std::string bytes = log.Serialize();
  s.manifest.replay_sha256 = Sha256Hex(bytes);
  return bytes;
}

absl::Status WriteReplayLog(TrainingCall& s,
                            const std::vector<int64_t>& steps) {
  ASSIGN_OR_RETURN(const std::string bytes, ReplayLogBytes(s, steps));
  return WriteFileAtomically(
      s.options.env, PathIn(s.options.run_dir, model::kReplayLogFile), bytes);
}

// On resume, replay.bin must describe exactly the checkpoints that
// train-state.pt covers. run.json's replay_sha256 cannot be trusted for
// that: a crash or a failed commit after train-state.pt moved forward but
// before run.json did leaves it one checkpoint behind, and one before
// train-state.pt moved can leave replay.bin one checkpoint ahead. So the
// log is recomputed, and replay.bin rewritten only when it differs.
absl::Status RestoreReplayLog(TrainingCall& s) {
  std::vector<int64_t> steps;
  for (const CheckpointInfo& c : s.manifest.checkpoints)
    steps.push_back(c.step);
  if (steps.empty()) {
    s.manifest.replay_sha256.clear();
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const std::string bytes, ReplayLogBytes(s, steps));
  const std::string path = PathIn(s.options.run_dir, model::kReplayLogFile);
  absl::StatusOr<std::string> on_disk = s.options.env->ReadFile(path);
  if (on_disk.ok() && *on_disk == bytes) return absl::OkStatus();
  if (!on_disk.ok() && !absl::IsNotFound(on_disk.status())) {
    return on_disk.status();
  }
  return WriteFileAtomically(s.options.env, path, bytes);
}

// run.json and, once the run is complete, model.toml (the model description
// that build-store and retraced read; written after run.json so that a
// description always names a finished run).
absl::Status WriteRunFiles(const TrainingCall& s) {
  const std::string& dir = s.options.run_dir;
  RETURN_IF_ERROR(WriteFileAtomically(s.options.env, PathIn(dir, kRunJsonFile),
                                      FormatRunJson(s.manifest)));
  if (!s.manifest.complete) return absl::OkStatus();
  return WriteFileAtomically(
      s.options.env, PathIn(dir, run::kModelDescriptionFile),
      run::FormatModelDescription(DescribeRunModel(s.manifest)));
}

// Order matters for crash safety: everything a resume needs from this step
// (checkpoint, replay log, losses) is durable before train-state.pt moves
// forward, and run.json, which readers trust, comes last.
absl::Status SaveProgress(TrainingCall& s, int64_t steps_done,
                          bool checkpoint) {
  const std::string& dir = s.options.run_dir;
  if (checkpoint) {
    const std::string path = PathIn(dir, CheckpointFileName(steps_done));
    RETURN_IF_ERROR(s.net->Save(path + kTempSuffix));
    RETURN_IF_ERROR(CommitFile(s.options.env, path + kTempSuffix, path));
    ASSIGN_OR_RETURN(CheckpointInfo info, DescribeCheckpoint(s, steps_done));
    s.manifest.checkpoints.push_back(info);
    std::vector<int64_t> steps;
    for (const CheckpointInfo& c : s.manifest.checkpoints) {
      steps.push_back(c.step);
    }
    RETURN_IF_ERROR(WriteReplayLog(s, steps));
  }
  RETURN_IF_ERROR(WriteFileAtomically(s.options.env, PathIn(dir, kLossLogFile),
                                      FormatLossLog(s.losses)));
  RETURN_IF_ERROR(SaveTrainState(s, steps_done));
  s.manifest.steps_done = steps_done;
  s.manifest.complete = steps_done == s.config.steps;
  return WriteRunFiles(s);
}

// Decides between a fresh start and a resume; returns the first step to run.
absl::StatusOr<int64_t> PrepareRunDirectory(TrainingCall& s) {
  const std::string& dir = s.options.run_dir;
  const std::string run_json = PathIn(dir, kRunJsonFile);
  absl::StatusOr<std::string> text = s.options.env->ReadFile(run_json);
  if (!text.ok() && !absl::IsNotFound(text.status())) return text.status();
  if (text.ok()) {
    ASSIGN_OR_RETURN(RunManifest existing, ParseRunJson(*text, run_json));
    RETURN_IF_ERROR(CheckSameRun(existing, s.manifest, dir));
    if (!s.options.resume) {
      return absl::FailedPreconditionError(absl::StrCat(
          "run directory ", dir, " already holds this run (",
          existing.steps_done, " of ", existing.config.steps,
          " steps done); pass --resume to continue it or choose another "
          "--run-dir"));
    }
    if (existing.threads != s.manifest.threads) {
      RETRACE_LOG(WARNING)
          << "run " << dir << " was trained with " << existing.threads
          << " threads, resuming with " << s.manifest.threads
          << ": checkpoints may differ in the last bits from an "
             "uninterrupted run";
    }
    const std::string state = PathIn(dir, kTrainStateFile);
    ASSIGN_OR_RETURN(const bool have_state, s.options.env->FileExists(state));
    if (have_state) {
      ASSIGN_OR_RETURN(const int64_t steps_done, LoadTrainState(s, state));
      ASSIGN_OR_RETURN(std::string loss_text,
                       s.options.env->ReadFile(PathIn(dir, kLossLogFile)));
      ASSIGN_OR_RETURN(s.losses,
                       ParseLossLog(loss_text, PathIn(dir, kLossLogFile)));
      if (static_cast<int64_t>(s.losses.size()) < steps_done) {
        return absl::DataLossError(absl::StrCat(
            PathIn(dir, kLossLogFile), " has ", s.losses.size(),
            " steps but the resume state is at step ", steps_done));
      }
      s.losses.resize(static_cast<size_t>(steps_done));
      // The checkpoint list is rebuilt from the files: run.json may lag one
      // checkpoint behind train-state.pt after a crash.
      for (int64_t step :
           CheckpointSteps(s.config.steps, s.config.checkpoint_every)) {
        if (step > steps_done) break;
        absl::StatusOr<CheckpointInfo> info = DescribeCheckpoint(s, step);
        if (!info.ok()) {
          return absl::DataLossError(
              absl::StrCat("cannot resume ", dir, ": checkpoint of step ", step,
                           " is unreadable: ", info.status().message()));
        }
        s.manifest.checkpoints.push_back(*std::move(info));
      }
      RETURN_IF_ERROR(RestoreReplayLog(s));
      s.manifest.steps_done = steps_done;
      s.manifest.complete = existing.complete && steps_done == s.config.steps;
      RETRACE_LOG(INFO) << "resuming " << dir << " at step " << steps_done
                        << " of " << s.config.steps;
      return steps_done;
    }
  }
  // A new run: record it at once so that a conflicting run is refused even
  // before the first checkpoint.
  RETURN_IF_ERROR(
      WriteFileAtomically(s.options.env, run_json, FormatRunJson(s.manifest)));
  return 0;
}

}  // namespace

absl::StatusOr<TrainResult> Train(const TrainConfig& config,
                                  const data::ImageSet& images,
                                  absl::Span<const int64_t> sample_ids,
                                  const TrainOptions& options) {
  RETURN_IF_ERROR(ValidateTrainConfig(config));
  if (images.size() == 0) {
    return absl::InvalidArgumentError("training data is empty");
  }
  if (images.height != images.width ||
      static_cast<int64_t>(images.pixels.size()) !=
          images.size() * images.image_numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "training images must be square with size()·C·H·W pixels; got ",
        images.size(), " images of ", images.channels, "×", images.height, "×",
        images.width, " and ", images.pixels.size(), " pixel values"));
  }
  if (!sample_ids.empty() &&
      static_cast<int64_t>(sample_ids.size()) != images.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        sample_ids.size(), " sample ids for ", images.size(), " images"));
  }
  if (options.run_dir.empty()) {
    return absl::InvalidArgumentError("no run directory given");
  }
  ASSIGN_OR_RETURN(const model::DeviceChoice device,
                   model::ResolveDevice(options.device));
  if (options.threads > 0) at::set_num_threads(options.threads);

  TrainingCall s{config, options, images, {}, {}, {}, nullptr, nullptr, {}};
  s.sample_ids.assign(sample_ids.begin(), sample_ids.end());
  if (s.sample_ids.empty()) {
    for (int64_t n = 0; n < images.size(); ++n) s.sample_ids.push_back(n);
  }
  ASSIGN_OR_RETURN(
      BatchOrder order,
      BatchOrder::Create(config.run_seed, images.size(), config.batch_size));
  ASSIGN_OR_RETURN(
      const model::NoiseSchedule schedule,
      model::NoiseSchedule::Create(config.schedule, config.num_timesteps));
  ASSIGN_OR_RETURN(
      s.net, model::UNetModel::Create(
                 UNetConfigFor(config.model, images.channels, images.height),
                 config.run_seed));
  // Initialised on the host (the same weights everywhere), then moved.
  RETURN_IF_ERROR(model::MoveModelTo(*s.net, device));
  const torch::Device torch_device = s.net->device();

  s.manifest.config = config;
  s.manifest.dataset = DescribeDataset(images, s.sample_ids);
  s.manifest.parameter_count = model::CountParameters(*s.net);
  s.manifest.threads = at::get_num_threads();
  s.identity = RunIdentityDigest(s.manifest);

  RETURN_IF_ERROR(CallTorch("creating the Adam optimizer", [&]() {
    std::vector<torch::Tensor> parameters;
    for (const model::NamedParameter& p : s.net->NamedParameters()) {
      parameters.push_back(p.tensor);
    }
    s.optimizer = std::make_unique<torch::optim::Adam>(
        parameters, torch::optim::AdamOptions(config.learning_rate)
                        .betas({kAdamBeta1, kAdamBeta2})
                        .eps(kAdamEps));
    return absl::OkStatus();
  }));

  RETURN_IF_ERROR(EnsureWritableDirectory(options.env, options.run_dir));
  ASSIGN_OR_RETURN(
      std::unique_ptr<DirectoryLock> lock,
      DirectoryLock::Acquire(options.run_dir, DirectoryLock::Mode::kExclusive,
                             "another training job"));
  ASSIGN_OR_RETURN(const int64_t start_step, PrepareRunDirectory(s));

  TrainResult result;
  result.start_step = start_step;
  const std::vector<int64_t> checkpoint_steps =
      CheckpointSteps(config.steps, config.checkpoint_every);
  const int64_t numel = images.image_numel();
  const int64_t batch = config.batch_size;
  std::vector<float> pixels(static_cast<size_t>(batch * numel));
  std::vector<float> noise(static_cast<size_t>(batch * numel));
  std::vector<int64_t> timesteps(static_cast<size_t>(batch));
  const std::vector<int64_t> shape = {batch, images.channels, images.height,
                                      images.width};

  ProgressReporter progress(options.progress_out, options.progress_is_tty,
                            start_step, config.steps,
                            options.progress_interval_s);
  const auto started = std::chrono::steady_clock::now();
  s.net->SetTraining(true);
  int64_t steps_done = start_step;
  bool stopped = false;
  for (int64_t step = start_step; step < config.steps; ++step) {
    const std::vector<int64_t> members = order.Batch(step);
    for (int64_t p = 0; p < batch; ++p) {
      const absl::Span<const float> image = images.Image(members[p]);
      std::copy(image.begin(), image.end(), pixels.begin() + p * numel);
      timesteps[p] =
          model::TrainTimestep(config.run_seed, step, p, config.num_timesteps);
      model::TrainNoise(config.run_seed, step, p, noise.data() + p * numel,
                        numel);
    }
    ASSIGN_OR_RETURN(
        const float loss,
        CallTorch(
            absl::StrCat("training step ", step),
            [&]() -> absl::StatusOr<float> {
              // from_blob borrows the buffers, which outlive the step.
              // (copied to the model's device when it is not the CPU)
              const torch::Tensor x =
                  torch::from_blob(pixels.data(), shape, torch::kFloat)
                      .to(torch_device);
              const torch::Tensor eps =
                  torch::from_blob(noise.data(), shape, torch::kFloat)
                      .to(torch_device);
              const torch::Tensor t =
                  torch::from_blob(timesteps.data(), {batch}, torch::kLong)
                      .to(torch_device);
              ASSIGN_OR_RETURN(torch::Tensor per_example,
                               model::DiffusionLoss(*s.net, schedule,
                                                    config.loss, x, t, eps));
              torch::Tensor mean = per_example.mean();
              s.optimizer->zero_grad();
              mean.backward();
              s.optimizer->step();
              return mean.item<float>();
            }));
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat("training diverged: loss is ",
                                              loss, " at step ", step,
                                              "; try a lower learning rate"));
    }
    s.losses.push_back(loss);
    steps_done = step + 1;
    progress.Update(steps_done, loss);

    const bool checkpoint = std::binary_search(
        checkpoint_steps.begin(), checkpoint_steps.end(), steps_done);
    const bool stop = steps_done < config.steps && options.should_stop &&
                      options.should_stop(steps_done);
    const bool periodic = options.save_state_every > 0 &&
                          steps_done % options.save_state_every == 0;
    if (checkpoint || stop || periodic) {
      RETURN_IF_ERROR(SaveProgress(s, steps_done, checkpoint));
    }
    if (stop) {
      stopped = true;
      break;
    }
  }
  if (steps_done > start_step) progress.Finish();
  if (!stopped && steps_done == config.steps && !s.manifest.complete) {
    // Resuming a run whose last checkpoint was saved but not marked complete.
    s.manifest.steps_done = steps_done;
    s.manifest.complete = true;
    RETURN_IF_ERROR(WriteRunFiles(s));
  } else if (!stopped && s.manifest.complete && steps_done == start_step) {
    // A finished run trained again: nothing new, but runs written before
    // model descriptions existed get their model.toml.
    RETURN_IF_ERROR(WriteRunFiles(s));
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count();
  result.steps_done = steps_done;
  result.complete = steps_done == config.steps;
  result.checkpoints = s.manifest.checkpoints;
  result.steps_per_second =
      result.seconds > 0 ? double(steps_done - start_step) / result.seconds : 0;
  result.loss_ema = progress.loss_ema();
  return result;
}

model::UNetConfig UNetConfigFor(const ModelConfig& model,
                                int64_t image_channels, int64_t image_size) {
  model::UNetConfig unet;
  unet.base_channels = model.base_channels;
  unet.channel_mults = model.channel_mults;
  unet.attention = model.attention;
  unet.norm_groups = model.norm_groups;
  unet.image_channels = image_channels;
  unet.image_size = image_size;
  return unet;
}

}  // namespace retrace::jobs

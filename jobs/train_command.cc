// `retrace-batch train`: flags -> TrainConfig/TrainOptions, data loading,
// SIGINT handling and the summary printed at the end.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "jobs/command.h"
#include "jobs/train.h"
#include "server/data/mixture.h"
#include "server/model/device.h"

namespace retrace::jobs {
namespace {

// Set from the signal handler; a handler can reach nothing else.
std::atomic<bool> interrupt_requested{false};

extern "C" void OnInterrupt(int signal_number) {
  interrupt_requested.store(true);
  // A second signal kills the process the usual way.
  std::signal(signal_number, SIG_DFL);
}

struct TrainFlags {
  std::string data;
  uint64_t data_seed = 0;
  std::string fashion_mnist_dir;
  std::string mnist_dir;
  std::string run_dir;
  bool resume = false;
  int64_t steps = 600;
  int64_t batch_size = 32;
  int64_t checkpoint_every = 200;
  double learning_rate = 1e-3;
  uint64_t seed = 0;
  int64_t base_channels = 16;
  std::string channel_mults = "1,2,4";
  bool no_attention = false;
  int64_t norm_groups = 8;
  std::string schedule = "cosine";
  int timesteps = 1000;
  std::string loss = "mse";
  int threads = 0;
  std::string device = "auto";
  int64_t save_state_every = 0;
  double progress_interval = 5.0;
  bool quiet = false;
};

int Usage(absl::string_view message) {
  std::fprintf(
      stderr,
      "retrace-batch train: %.*s\nRun with --help for more information.\n",
      static_cast<int>(message.size()), message.data());
  return kExitUsage;
}

int Failure(const absl::Status& status) {
  std::fprintf(stderr, "retrace-batch train: %s\n", status.ToString().c_str());
  return kExitFailure;
}

int RunTrain(const TrainFlags& flags) {
  // Before the data is read: `--device cuda` without CUDA fails at once.
  absl::StatusOr<model::DeviceChoice> device =
      model::ParseDeviceChoice(flags.device);
  if (!device.ok()) return Usage(device.status().message());
  device = model::ResolveDevice(*device);
  if (!device.ok()) return Failure(device.status());
  TrainConfig config;
  config.dataset_seed = flags.data_seed;
  config.steps = flags.steps;
  config.batch_size = flags.batch_size;
  config.checkpoint_every = flags.checkpoint_every;
  config.learning_rate = flags.learning_rate;
  config.run_seed = flags.seed;
  config.model.base_channels = flags.base_channels;
  config.model.attention = !flags.no_attention;
  config.model.norm_groups = flags.norm_groups;
  config.num_timesteps = flags.timesteps;
  config.model.channel_mults.clear();
  for (absl::string_view part : absl::StrSplit(flags.channel_mults, ',')) {
    int64_t mult = 0;
    if (!absl::SimpleAtoi(part, &mult) || mult < 1) {
      return Usage(
          absl::StrCat("--channel-mults must be positive integers "
                       "separated by commas, got \"",
                       flags.channel_mults, "\""));
    }
    config.model.channel_mults.push_back(mult);
  }
  absl::StatusOr<model::ScheduleType> schedule =
      model::ParseScheduleType(flags.schedule);
  if (!schedule.ok()) return Usage(schedule.status().message());
  config.schedule = *schedule;
  absl::StatusOr<model::LossType> loss = model::ParseLossType(flags.loss);
  if (!loss.ok()) return Usage(loss.status().message());
  config.loss = *loss;
  if (absl::Status valid = ValidateTrainConfig(config); !valid.ok()) {
    return Usage(valid.message());
  }
  absl::StatusOr<data::MixtureSpec> spec = data::ParseMixtureSpec(flags.data);
  if (!spec.ok()) return Usage(spec.status().message());
  spec->seed = flags.data_seed;
  config.dataset_spec = data::FormatMixtureSpec(*spec);

  const data::DataLocations locations =
      data::DataLocationsFrom(flags.fashion_mnist_dir, flags.mnist_dir);
  absl::StatusOr<data::Mixture> mixture = data::BuildMixture(*spec, locations);
  if (!mixture.ok()) return Failure(mixture.status());

  TrainOptions options;
  options.run_dir = flags.run_dir;
  options.resume = flags.resume;
  options.threads =
      flags.threads > 0
          ? flags.threads
          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.device = *device;
  options.save_state_every = flags.save_state_every;
  options.progress_out = flags.quiet ? nullptr : stderr;
  options.progress_is_tty = ::isatty(STDERR_FILENO) == 1;
  options.progress_interval_s = flags.progress_interval;
  options.should_stop = [](int64_t) { return interrupt_requested.load(); };

  std::signal(SIGINT, OnInterrupt);
  std::signal(SIGTERM, OnInterrupt);
  std::fprintf(
      stderr,
      "train: %lld samples from \"%s\", %lld steps of batch %lld, "
      "%d threads, device %s, run dir %s\n",
      static_cast<long long>(mixture->images.size()),
      config.dataset_spec.c_str(), static_cast<long long>(config.steps),
      static_cast<long long>(config.batch_size), options.threads,
      model::DeviceChoiceName(options.device), options.run_dir.c_str());
  absl::StatusOr<TrainResult> result =
      Train(config, mixture->images, mixture->sample_ids, options);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (!result.ok()) return Failure(result.status());
  if (!result->complete) {
    std::fprintf(stderr,
                 "retrace-batch train: interrupted after step %lld of %lld; "
                 "state saved, rerun with --resume to continue\n",
                 static_cast<long long>(result->steps_done),
                 static_cast<long long>(config.steps));
    return kExitFailure;
  }
  std::printf(
      "trained %lld steps (%lld this run, %.2f steps/s, %.1f s); "
      "loss %.4f\n",
      static_cast<long long>(result->steps_done),
      static_cast<long long>(result->steps_done - result->start_step),
      result->steps_per_second, result->seconds, result->loss_ema);
  for (const CheckpointInfo& c : result->checkpoints) {
    std::printf("  %s/%s step %lld w=%g sha256 %s\n", options.run_dir.c_str(),
                c.file.c_str(), static_cast<long long>(c.step), c.weight,
                c.sha256.c_str());
  }
  return kExitOk;
}

}  // namespace

Subcommand RegisterTrainCommand(CLI::App& parent) {
  auto flags = std::make_shared<TrainFlags>();
  CLI::App* app = parent.add_subcommand(
      "train",
      "Train the built-in UNet (DDPM, Adam) and write checkpoints, their "
      "sha256 and weights, a replay log and a loss log into a run directory");
  app->add_option(
         "--data", flags->data,
         "Training set as a mixture spec, e.g. "
         "\"fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038\"")
      ->required();
  app->add_option("--data-seed", flags->data_seed,
                  "Seed of the mixture's sampling and order")
      ->capture_default_str();
  app->add_option(
      "--fashion-mnist-dir", flags->fashion_mnist_dir,
      "Fashion-MNIST IDX directory (default: the Debian package's)");
  app->add_option("--mnist-dir", flags->mnist_dir,
                  "MNIST JSON directory (default: scripts/fetch_data.sh's)");
  app->add_option("--run-dir", flags->run_dir,
                  "Directory for run.json, checkpoints, replay.bin, loss.csv")
      ->required();
  app->add_flag("--resume", flags->resume,
                "Continue the run in --run-dir from its last saved state");
  app->add_option("--steps", flags->steps, "Optimizer steps")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--batch-size", flags->batch_size, "Samples per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--checkpoint-every", flags->checkpoint_every,
                  "Save a checkpoint every K steps (and at the last step)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--lr", flags->learning_rate, "Adam learning rate")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option(
         "--seed", flags->seed,
         "Run seed: UNet initialization, batch order, timesteps, noise")
      ->capture_default_str();
  app->add_option("--base-channels", flags->base_channels, "UNet base channels")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--channel-mults", flags->channel_mults,
                  "UNet channel multipliers per level")
      ->capture_default_str();
  app->add_flag("--no-attention", flags->no_attention,
                "Leave out self-attention at the lowest resolution");
  app->add_option("--norm-groups", flags->norm_groups, "GroupNorm groups")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--schedule", flags->schedule, "Noise schedule")
      ->capture_default_str()
      ->check(CLI::IsMember({"cosine", "linear"}));
  app->add_option("--timesteps", flags->timesteps, "Diffusion timesteps T")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
  app->add_option("--loss", flags->loss, "Per-example loss")
      ->capture_default_str()
      ->check(CLI::IsMember({"mse", "l1"}));
  app->add_option(
         "--threads", flags->threads,
         "LibTorch threads (0: one per core); fixed for reproducibility")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app->add_option("--device", flags->device,
                  "Where the model trains: auto (CUDA when LibTorch has it "
                  "and a GPU is present), cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app->add_option(
         "--save-state-every", flags->save_state_every,
         "Also save the resume state every N steps (0: at checkpoints)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app->add_option(
         "--progress-interval", flags->progress_interval,
         "Seconds between progress lines when stderr is not a terminal")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_flag("--quiet", flags->quiet, "No progress output");
  return Subcommand{app, [flags] { return RunTrain(*flags); }};
}

}  // namespace retrace::jobs

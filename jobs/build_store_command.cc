// `retrace-batch build-store` and `retrace-batch join-store`: flags ->
// StoreBuildConfig/StoreBuildOptions, loading the run's dataset, SIGINT
// handling and the summary (build_store.h, docs/store-build.md).
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
#include "jobs/build_store.h"
#include "jobs/command.h"
#include "jobs/run_dir.h"
#include "server/data/mixture.h"
#include "server/run/model_description.h"

namespace retrace::jobs {
namespace {

// Set from the signal handler; a handler can reach nothing else.
std::atomic<bool> stop_requested{false};

extern "C" void OnStopSignal(int signal_number) {
  stop_requested.store(true);
  std::signal(signal_number, SIG_DFL);  // a second signal kills as usual
}

struct BuildFlags {
  std::string model_path;
  std::string dataset;  // empty: the run's
  bool dataset_seed_set = false;
  uint64_t dataset_seed = 0;
  std::string fashion_mnist_dir;
  std::string mnist_dir;
  std::string out_dir;
  int64_t dim = 1024;
  std::string projection = "sjlt";
  int sparsity = 4;
  uint64_t proj_seed = 0;
  uint64_t store_seed = 0;
  int64_t buckets = 10;
  std::string bucket_edges;
  int64_t grad_timesteps = 1;
  std::string param_regex;
  std::string dtype = "fp16";
  int64_t samples_per_shard = 4096;
  bool replay = false;
  bool no_replay = false;
  int threads = 0;
  std::string device = "auto";
  int64_t batch = 64;
  std::string shard;
  double progress_interval = 5.0;
  bool quiet = false;
};

int Usage(absl::string_view command, absl::string_view message) {
  std::fprintf(stderr,
               "retrace-batch %.*s: %.*s\nRun with --help for more "
               "information.\n",
               static_cast<int>(command.size()), command.data(),
               static_cast<int>(message.size()), message.data());
  return kExitUsage;
}

int Failure(absl::string_view command, const absl::Status& status) {
  std::fprintf(stderr, "retrace-batch %.*s: %s\n",
               static_cast<int>(command.size()), command.data(),
               status.ToString().c_str());
  return kExitFailure;
}

// "i/n" with 0 <= i < n.
bool ParseShard(const std::string& text, int64_t* index, int64_t* count) {
  std::vector<std::string> parts = absl::StrSplit(text, '/');
  return parts.size() == 2 && absl::SimpleAtoi(parts[0], index) &&
         absl::SimpleAtoi(parts[1], count) && *count >= 1 && *index >= 0 &&
         *index < *count;
}

int RunBuildStore(const BuildFlags& flags) {
  constexpr absl::string_view kCommand = "build-store";
  StoreBuildConfig config;
  if (!kernels::ParseProjectionType(flags.projection, &config.projection)) {
    return Usage(kCommand, "--projection must be sjlt or rademacher");
  }
  if (!kernels::ParseDType(flags.dtype.c_str(), &config.dtype)) {
    return Usage(kCommand, "--dtype must be fp16, bf16 or fp32");
  }
  config.dim = flags.dim;
  config.sparsity = flags.sparsity;
  config.projection_seed = flags.proj_seed;
  config.store_seed = flags.store_seed;
  config.num_buckets = flags.buckets;
  if (!flags.bucket_edges.empty()) {
    for (absl::string_view part : absl::StrSplit(flags.bucket_edges, ',')) {
      int64_t edge = 0;
      if (!absl::SimpleAtoi(part, &edge)) {
        return Usage(kCommand,
                     absl::StrCat("--bucket-edges must be integers separated "
                                  "by commas, got \"",
                                  flags.bucket_edges, "\""));
      }
      config.bucket_edges.push_back(edge);
    }
  }
  config.grad_timesteps = flags.grad_timesteps;
  config.param_regex = flags.param_regex;
  config.samples_per_shard = flags.samples_per_shard;
  if (flags.replay && flags.no_replay) {
    return Usage(kCommand, "--replay and --no-replay exclude each other");
  }
  config.replay = flags.replay      ? ReplayMode::kOn
                  : flags.no_replay ? ReplayMode::kOff
                                    : ReplayMode::kAuto;

  StoreBuildOptions options;
  // Before the model and data are read: `--device cuda` without CUDA fails
  // at once.
  absl::StatusOr<model::DeviceChoice> device =
      model::ParseDeviceChoice(flags.device);
  if (!device.ok()) return Usage(kCommand, device.status().message());
  device = model::ResolveDevice(*device);
  if (!device.ok()) return Failure(kCommand, device.status());
  options.device = *device;
  options.model_path = flags.model_path;
  options.out_dir = flags.out_dir;
  if (!flags.shard.empty() &&
      !ParseShard(flags.shard, &options.part_index, &options.num_parts)) {
    return Usage(kCommand, absl::StrCat("--shard must be i/n with 0 <= i < n, "
                                        "got \"",
                                        flags.shard, "\""));
  }
  options.threads =
      flags.threads > 0
          ? flags.threads
          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.batch_rows = flags.batch;
  options.progress_out = flags.quiet ? nullptr : stderr;
  options.progress_is_tty = ::isatty(STDERR_FILENO) == 1;
  options.progress_interval_s = flags.progress_interval;
  options.should_stop = [](int64_t) { return stop_requested.load(); };

  // The dataset: by default the description's own.
  absl::StatusOr<run::ModelDescription> description =
      run::LoadModelDescription(flags.model_path, /*verify_checksums=*/false);
  if (!description.ok()) return Failure(kCommand, description.status());
  absl::StatusOr<data::MixtureSpec> spec =
      run::TrainingMixtureSpec(*description);
  if (!spec.ok()) return Failure(kCommand, spec.status());
  if (!flags.dataset.empty()) {
    spec = data::ParseMixtureSpec(flags.dataset);
    if (!spec.ok()) return Usage(kCommand, spec.status().message());
    spec->seed = description->data.seed;
  }
  if (flags.dataset_seed_set) spec->seed = flags.dataset_seed;
  data::DataLocations locations =
      data::DataLocationsFrom(flags.fashion_mnist_dir, flags.mnist_dir);
  locations.folder_spec = {description->image.channels,
                           description->image.height, description->image.width};
  absl::StatusOr<data::Mixture> mixture = data::BuildMixture(*spec, locations);
  if (!mixture.ok()) return Failure(kCommand, mixture.status());
  options.dataset_name = data::FormatMixtureSpec(*spec);
  options.dataset_seed = spec->seed;
  options.dataset_shuffle = spec->shuffle;
  for (const data::MixtureComponent& c : spec->components) {
    if (c.source == "folder") {
      options.dataset_root = c.path;
      break;
    }
  }

  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);
  std::fprintf(stderr,
               "build-store: %lld samples from \"%s\", model %s (%s, %zu "
               "checkpoints), %s, %d threads, device %s, out %s\n",
               static_cast<long long>(mixture->images.size()),
               options.dataset_name.c_str(), description->source.c_str(),
               std::string(run::ModelKindName(description->kind)).c_str(),
               description->checkpoints.size(),
               options.num_parts > 0 ? absl::StrCat("part ", options.part_index,
                                                    "/", options.num_parts)
                                           .c_str()
                                     : "whole store",
               options.threads, model::DeviceChoiceName(options.device),
               flags.out_dir.c_str());
  absl::StatusOr<StoreBuildResult> result =
      BuildStore(config, mixture->images, mixture->sample_ids, options);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (!result.ok()) return Failure(kCommand, result.status());
  if (!result->complete) {
    std::fprintf(
        stderr,
        "retrace-batch build-store: stopped after %lld of %lld "
        "samples; rerun the same command to resume\n",
        static_cast<long long>(result->first_sample + result->resumed_samples +
                               result->built_samples),
        static_cast<long long>(result->end_sample));
    return kExitFailure;
  }
  std::printf(
      "built samples [%lld, %lld) of %lld (%lld resumed, %lld computed, "
      "%.2f samples/s, %.1f s), p = %lld\n",
      static_cast<long long>(result->first_sample),
      static_cast<long long>(result->end_sample),
      static_cast<long long>(result->total_samples),
      static_cast<long long>(result->resumed_samples),
      static_cast<long long>(result->built_samples), result->samples_per_second,
      result->seconds, static_cast<long long>(result->input_dim));
  if (result->manifest.has_value()) {
    std::printf("store %s: %s/manifest.json\n",
                result->manifest->store_id.c_str(), flags.out_dir.c_str());
  } else {
    std::printf(
        "part %s done; when every part is, run: retrace-batch join-store "
        "--out %s\n",
        flags.shard.c_str(), flags.out_dir.c_str());
  }
  return kExitOk;
}

}  // namespace

Subcommand RegisterBuildStoreCommand(CLI::App& parent) {
  auto flags = std::make_shared<BuildFlags>();
  CLI::App* app = parent.add_subcommand(
      "build-store",
      "Build the attribution store of a model: per sample, checkpoint "
      "and timestep slot the projected unit gradient and its norm, "
      "self-influence and timestep diagnostics (resumable, byte-identical)");
  app->add_option("--model,--run", flags->model_path,
                  "Model description (model.toml, or a folder holding one "
                  "such as a retrace-batch train run directory)")
      ->required();
  app->add_option("--out", flags->out_dir, "Store directory")->required();
  app->add_option("--dataset", flags->dataset,
                  "Mixture spec of the training set (default: the model "
                  "description's data); must match its data fingerprint");
  app->add_option_function<uint64_t>(
      "--dataset-seed",
      [flags](const uint64_t& seed) {
        flags->dataset_seed = seed;
        flags->dataset_seed_set = true;
      },
      "Mixture seed (default: the model description's)");
  app->add_option("--fashion-mnist-dir", flags->fashion_mnist_dir,
                  "Fashion-MNIST IDX directory");
  app->add_option("--mnist-dir", flags->mnist_dir, "MNIST JSON directory");
  app->add_option("--dim", flags->dim, "Projected dimension D")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--projection", flags->projection, "Random projection")
      ->capture_default_str()
      ->check(CLI::IsMember({"sjlt", "rademacher"}));
  app->add_option("--sparsity", flags->sparsity, "SJLT non-zeros per column")
      ->capture_default_str()
      ->check(CLI::Range(1, 8));
  app->add_option("--proj-seed", flags->proj_seed, "Seed of the projection")
      ->capture_default_str();
  app->add_option("--store-seed", flags->store_seed,
                  "Seed of the training-side timesteps and noise")
      ->capture_default_str();
  app->add_option("--buckets", flags->buckets, "Equal timestep buckets B")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--bucket-edges", flags->bucket_edges,
                  "Bucket edges 0,e1,...,T (overrides --buckets)");
  app->add_option("--grad-timesteps", flags->grad_timesteps,
                  "Timesteps m averaged per bucket gradient")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--param-regex", flags->param_regex,
                  "Project only parameters whose name matches (full match)");
  app->add_option("--dtype", flags->dtype, "Stored vector type")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}));
  app->add_option("--samples-per-shard", flags->samples_per_shard,
                  "Samples per shard file")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_flag("--replay", flags->replay,
                "Require the replay slot (default: when the model's "
                "training run logged it)");
  app->add_flag("--no-replay", flags->no_replay, "Leave out the replay slot");
  app->add_option("--threads", flags->threads,
                  "LibTorch threads (0: one per core); the store's bytes are "
                  "reproducible at a fixed count")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app->add_option("--device", flags->device,
                  "Where the per-sample gradients run: auto (CUDA when "
                  "LibTorch has it and a GPU is present), cpu or cuda; the "
                  "projection runs on the CPU")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app->add_option("--batch", flags->batch,
                  "Rows (sample x timestep) per featurizer pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_option("--shard", flags->shard,
                  "Build only part i of n (i/n), then join with join-store");
  app->add_option("--progress-interval", flags->progress_interval,
                  "Seconds between progress lines when stderr is not a "
                  "terminal")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app->add_flag("--quiet", flags->quiet, "No progress output");
  return Subcommand{app, [flags] { return RunBuildStore(*flags); }};
}

Subcommand RegisterJoinStoreCommand(CLI::App& parent) {
  auto out = std::make_shared<std::string>();
  CLI::App* app = parent.add_subcommand(
      "join-store",
      "Join the parts of a store built with build-store --shard i/n (all "
      "parts' files in one directory) into a finished store");
  app->add_option("--out", *out, "Store directory holding every part")
      ->required();
  return Subcommand{app, [out] {
                      absl::StatusOr<store::Manifest> manifest =
                          JoinStore(*out);
                      if (!manifest.ok()) {
                        return Failure("join-store", manifest.status());
                      }
                      std::printf(
                          "store %s: %lld samples in %zu shards, %s/"
                          "manifest.json\n",
                          manifest->store_id.c_str(),
                          static_cast<long long>(manifest->num_samples),
                          manifest->shards.size(), out->c_str());
                      return kExitOk;
                    }};
}

}  // namespace retrace::jobs

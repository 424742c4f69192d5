// `retrace-batch eval`: flags to EvalConfig/EvalOptions (jobs/eval/eval.h),
// SIGINT/SIGTERM to a resumable stop.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "jobs/command.h"
#include "jobs/eval/eval.h"

namespace retrace::jobs {
namespace {

std::atomic<bool> eval_stop_requested{false};

extern "C" void OnEvalStop(int signal_number) {
  eval_stop_requested.store(true);
  std::signal(signal_number, SIG_DFL);
}

struct EvalFlags {
  std::string out;
  bool quick = false;
  std::string data;
  std::string seeds;
  std::string model;
  std::string queries;
  int64_t steps = 0;
  int64_t dim = 0;
  int64_t buckets = 0;
  int64_t queries_per_source = 0;
  bool lds = false;
  int64_t lds_models = 0;
  bool no_fidelity = false;
  std::string fidelity_dims;
  int threads = 0;
  std::string fashion_mnist_dir;
  std::string mnist_dir;
  std::string python = "/usr/bin/python3";
  std::string plots_script;
  double progress_interval = 10.0;
  bool quiet = false;
  std::string command_line;
};

int Usage(const std::string& message) {
  std::fprintf(
      stderr, "retrace-batch eval: %s\nRun with --help for more information.\n",
      message.c_str());
  return kExitUsage;
}

template <typename T>
bool ParseList(const std::string& text, std::vector<T>* out) {
  out->clear();
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    T value = 0;
    if (!absl::SimpleAtoi(part, &value)) return false;
    out->push_back(value);
  }
  return !out->empty();
}

int RunEvalCommand(const EvalFlags& flags) {
  eval::EvalConfig config =
      flags.quick ? eval::EvalConfig::Quick() : eval::EvalConfig();
  if (!flags.data.empty()) config.data = flags.data;
  config.model = flags.model;
  config.queries = flags.queries;
  // --quick includes LDS, which a model description cannot have: only an
  // explicit --lds asks for it (and is refused).
  if (!config.model.empty()) config.lds = false;
  if (!flags.seeds.empty() && !ParseList(flags.seeds, &config.seeds)) {
    return Usage("--seeds must be integers separated by commas, got \"" +
                 flags.seeds + "\"");
  }
  if (flags.steps > 0) config.steps = flags.steps;
  if (flags.dim > 0) config.dim = flags.dim;
  if (flags.buckets > 0) config.buckets = flags.buckets;
  if (flags.queries_per_source > 0)
    config.queries_per_source = flags.queries_per_source;
  if (flags.lds) config.lds = true;
  if (flags.lds_models > 0) config.lds_models = flags.lds_models;
  if (flags.no_fidelity) config.fidelity = false;
  if (!flags.fidelity_dims.empty() &&
      !ParseList(flags.fidelity_dims, &config.fidelity_dims)) {
    return Usage(
        "--fidelity-dims must be integers separated by commas, got \"" +
        flags.fidelity_dims + "\"");
  }
  eval::EvalOptions options;
  options.out_dir = flags.out;
  options.fashion_mnist_dir = flags.fashion_mnist_dir;
  options.mnist_dir = flags.mnist_dir;
  options.threads = flags.threads;
  options.python = flags.python;
  options.plots_script = flags.plots_script;
  options.command_line = flags.command_line;
  options.progress_out = flags.quiet ? nullptr : stderr;
  options.progress_is_tty = ::isatty(STDERR_FILENO) == 1;
  options.progress_interval_s = flags.progress_interval;
  options.should_stop = [] { return eval_stop_requested.load(); };
  std::signal(SIGINT, OnEvalStop);
  std::signal(SIGTERM, OnEvalStop);
  const absl::Status status = eval::RunEval(config, options);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (!status.ok()) {
    std::fprintf(stderr, "retrace-batch eval: %s\n", status.ToString().c_str());
    return kExitFailure;
  }
  std::printf("%s/report.md\n%s/report.json\n", flags.out.c_str(),
              flags.out.c_str());
  return kExitOk;
}

}  // namespace

Subcommand RegisterEvalCommand(CLI::App& parent, int argc, char** argv) {
  auto flags = std::make_shared<EvalFlags>();
  std::vector<std::string> words(argv, argv + argc);
  if (!words.empty()) words[0] = "retrace-batch";
  flags->command_line = absl::StrJoin(words, " ");
  CLI::App* app = parent.add_subcommand(
      "eval",
      "Evaluate the attributions: for each seed train the built-in UNet on a "
      "mixture with planted outliers, build its store and attribute held-out "
      "queries, then report gradient norm vs timestep, outlier detection, "
      "image tracing, generally influential samples, projection fidelity and "
      "(with --lds) the linear datamodeling score, as report.json, report.md "
      "and PNG plots. Interrupted, the same command continues where it "
      "stopped");
  app->add_option("--out", flags->out, "Output folder (also the resume state)")
      ->required();
  app->add_flag(
      "--quick", flags->quick,
      "The reduced evaluation (small mixture, 2 seeds, 30 steps, 6 LDS "
      "models) that CI runs; the flags below override its values");
  app->add_option(
      "--data", flags->data,
      std::string("Training mixture; components with fraction= are the "
                  "planted outliers (default \"") +
          eval::kDefaultEvalData + "\")");
  app->add_option(
      "--model", flags->model,
      "Evaluate a model trained elsewhere: its description (model.toml "
      "or a folder holding one); nothing is trained, --lds is refused");
  app->add_option("--queries", flags->queries,
                  "Held-out queries as DIR/<class>/<image> (needed when the "
                  "training data is an image folder)");
  app->add_option("--seeds", flags->seeds,
                  "Seeds of the whole pipeline, e.g. 1,2,3 (default 1,2,3)");
  app->add_option("--steps", flags->steps, "Training steps (default 300)");
  app->add_option("--dim", flags->dim, "Projection dimension D (default 512)");
  app->add_option("--buckets", flags->buckets, "Timestep buckets (default 5)");
  app->add_option("--queries-per-source", flags->queries_per_source,
                  "Held-out queries per mixture component (default 30)");
  app->add_flag("--lds", flags->lds,
                "Also measure the linear datamodeling score (retrains models)");
  app->add_option("--lds-models", flags->lds_models,
                  "Models retrained on random halves for LDS (default 32)");
  app->add_flag("--no-fidelity", flags->no_fidelity,
                "Skip the projection fidelity against full gradients");
  app->add_option("--fidelity-dims", flags->fidelity_dims,
                  "Projection dimensions of the fidelity part (default "
                  "256,512,1024,2048,4096)");
  app->add_option("--threads", flags->threads,
                  "LibTorch threads (default: one per hardware thread)");
  app->add_option("--fashion-mnist-dir", flags->fashion_mnist_dir,
                  "Fashion-MNIST IDX directory");
  app->add_option("--mnist-dir", flags->mnist_dir, "MNIST JSON directory");
  app->add_option("--python", flags->python,
                  "Python with matplotlib that draws the plots")
      ->capture_default_str();
  app->add_option(
      "--plots-script", flags->plots_script,
      "The plotting script (default: jobs/eval/plots.py of the sources)");
  app->add_option("--progress-interval", flags->progress_interval,
                  "Seconds between progress lines when not on a terminal")
      ->capture_default_str();
  app->add_flag("--quiet", flags->quiet, "No progress output");
  return {app, [flags] { return RunEvalCommand(*flags); }};
}

}  // namespace retrace::jobs

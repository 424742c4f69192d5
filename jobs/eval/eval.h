// `retrace-batch eval`: the attribution evaluation (docs/evaluation.md) as a
// job. For each seed it trains the built-in UNet on a mixture (or takes a
// model description of a model trained elsewhere), builds the store and
// attributes held-out queries from every source of the training set in
// process (the featurizer and scan that retraced uses), then
// measures
//   (a) gradient norm against timestep, from the store's statistics;
//   (b) outlier detection: self-influence (TracIn, ReTrac) against the plain
//       per-sample loss and a random ranking, on the planted component;
//   (c) image tracing: the share of top-k proponents from the query's source;
//   (d) generally influential samples: |G_τ|, unique count, mean Jaccard;
// and, on the first seed, (e) projection fidelity against full gradients and
// (f) the linear datamodeling score (LDS) from models retrained on random
// subsets. Every part reports the matched and the replay pairing.
//
// Output folder: eval-config.json (what the folder was started with),
// seed-<s>/{run,store,queries.json,scores.f32,analysis.json},
// fidelity.json, lds/model-<m>/{run,outputs.json}, lds.json and at the end
// report.json, report.md and the PNG plots. Each stage leaves its result
// file only when complete (written atomically), so an interrupted eval
// continues where it stopped; a folder started with other settings is
// refused.
//
// Not thread-safe: LibTorch's intra-op thread count is process-wide.
#ifndef RETRACE_JOBS_EVAL_EVAL_H_
#define RETRACE_JOBS_EVAL_EVAL_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace retrace::eval {

// The default training set: three similar Fashion-MNIST classes (T-shirt/top,
// Pullover, Shirt) and MNIST zeros planted at the paper's 3.8%.
inline constexpr char kDefaultEvalData[] =
    "fashion-mnist:train:classes=0:limit=300 + "
    "fashion-mnist:train:classes=2:limit=300 + "
    "fashion-mnist:train:classes=6:limit=300 + "
    "mnist:classes=0:fraction=0.038";

struct EvalConfig {
  // Mixture spec (server/data/mixture.h). Components with a fraction= are
  // the planted outliers of (b); every component is a query source of (c).
  std::string data = kDefaultEvalData;
  std::vector<uint64_t> seeds = {1, 2, 3};

  // A model description (server/run/model_description.h: a model.toml, or a
  // folder holding one) of a model trained elsewhere: then nothing is
  // trained, `data` and the recipe below are unused (the description names
  // its training data), each seed is a store (store and projection seed),
  // the replay pairing is reported only when the description names a
  // training run with a replay log, and --lds is refused.
  std::string model;
  // Held-out queries as an image tree DIR/<class>/<image> whose classes are
  // classes of the training set (required when the training data is an
  // image folder); empty: held-out images of the built-in datasets.
  std::string queries;

  // The training recipe (retrace-batch train's flags of the same names).
  int64_t steps = 300;
  int64_t batch_size = 32;
  int64_t checkpoint_every = 100;
  double learning_rate = 2e-3;
  int64_t base_channels = 8;
  int64_t norm_groups = 4;

  // The store (retrace-batch build-store's flags).
  int64_t dim = 512;
  int64_t buckets = 5;

  // Queries: this many held-out images per component, each attributed with
  // the default request (query_timesteps × noise_draws per bucket).
  int64_t queries_per_source = 30;
  int64_t query_timesteps = 2;
  int64_t noise_draws = 4;
  int64_t top_k = 10;       // (c) and (d)
  int64_t top_k_wide = 50;  // (c)

  // The fixed (t, ε) grid of the plain-loss baseline (b) and of the LDS
  // outputs (f): grid_timesteps evenly spaced t, grid_draws noises each.
  int64_t grid_timesteps = 10;
  int64_t grid_draws = 2;

  // (e)
  bool fidelity = true;
  std::vector<int64_t> fidelity_dims = {256, 512, 1024, 2048, 4096};
  int64_t fidelity_samples = 64;
  int64_t fidelity_queries = 8;

  // (f)
  bool lds = false;
  int64_t lds_models = 32;
  double lds_fraction = 0.5;
  int bootstrap_resamples = 1000;

  // The reduced evaluation of `--quick` (for CI): a small mixture, two
  // seeds, a short recipe, small stores, 6 LDS models.
  static EvalConfig Quick();
  nlohmann::json ToJson() const;
};

struct EvalOptions {
  std::string out_dir;
  std::string fashion_mnist_dir;  // empty: the defaults of server/data
  std::string mnist_dir;
  // LibTorch intra-op threads; 0: one per hardware thread.
  int threads = 0;
  // Python interpreter and script that draw the PNGs from report.json
  // (empty script: the one installed with the sources). A missing
  // interpreter or matplotlib is reported, not an error.
  std::string python = "/usr/bin/python3";
  std::string plots_script;
  // The command line, recorded in the report.
  std::string command_line;
  std::FILE* progress_out = nullptr;
  bool progress_is_tty = false;
  double progress_interval_s = 10.0;
  // Polled between work items; true stops the eval (resumable).
  std::function<bool()> should_stop;
};

// Runs (or continues) the evaluation in options.out_dir and writes the
// report. CANCELLED when stopped; FAILED_PRECONDITION for a folder started
// with other settings; INVALID_ARGUMENT for a bad config; the errors of
// training, the store build and data loading otherwise.
absl::Status RunEval(const EvalConfig& config, const EvalOptions& options);

// Renders report.md from report.json's object (exposed for tests).
std::string RenderReportMarkdown(const nlohmann::json& report);

}  // namespace retrace::eval

#endif  // RETRACE_JOBS_EVAL_EVAL_H_

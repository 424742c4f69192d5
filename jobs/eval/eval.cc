#include "jobs/eval/eval.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "jobs/build_store.h"
#include "jobs/eval/fidelity.h"
#include "jobs/eval/metrics.h"
#include "jobs/progress.h"
#include "jobs/run_dir.h"
#include "jobs/train.h"
#include "common/file_util.h"
#include "common/status.h"
#include "server/data/mixture.h"
#include "server/model/counter_rng.h"
#include "server/model/diffusion.h"
#include "server/run/model_description.h"
#include "server/scoring/scorer.h"
#include "server/service/model_featurizer.h"
#include "server/store/store_reader.h"

#ifndef RETRACE_EVAL_PLOTS_SCRIPT
#define RETRACE_EVAL_PLOTS_SCRIPT ""
#endif

namespace retrace::eval {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// The grid seed of (b) and (f): fixed, so every model meets the same (t, ε).
constexpr uint64_t kGridSeed = 0x6576616c67726964;  // "evalgrid"
constexpr uint64_t kQuerySeed = 7;                  // the requests' seed
constexpr uint64_t kLdsSubsetSeed = 0x6c647373;     // "ldss"
constexpr uint64_t kRandomScoreSeed = 0x72616e64;   // "rand"

// The four score columns of a query, in scores.f32 order.
struct Column {
  const char* pairing;
  const char* method;
};
constexpr Column kColumns[] = {{"matched", "tracin"},
                               {"matched", "retrac"},
                               {"replay", "tracin"},
                               {"replay", "retrac"}};
constexpr int kNumColumns = 4;

// The scan ranks at most this many samples per query (scorer.h); the eval
// asks for every sample's score, so N is bounded by it.
constexpr int64_t kMaxRanked = 4096;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// A stage's progress: a bar redrawn in place on a terminal, else a plain line
// every interval (as training's, without a loss).
class StageProgress {
 public:
  StageProgress(const EvalOptions& options, std::string what, int64_t total)
      : out_(options.progress_out),
        tty_(options.progress_is_tty),
        interval_(options.progress_interval_s),
        what_(std::move(what)),
        total_(total),
        start_(Clock::now()),
        last_(start_) {}
  void Update(int64_t done) {
    done_ = done;
    if (out_ == nullptr) return;
    const double since =
        std::chrono::duration<double>(Clock::now() - last_).count();
    if (since < (tty_ ? 0.2 : interval_) && done < total_) return;
    last_ = Clock::now();
    finished_ = done >= total_;
    Print(finished_);
  }
  void Finish() {
    if (out_ != nullptr && !finished_) Print(true);
  }

 private:
  void Print(bool final_line) {
    const double elapsed = Seconds(start_);
    const double rate = elapsed > 0 ? done_ / elapsed : 0;
    std::string line = absl::StrFormat("%s %lld/%lld", what_, done_, total_);
    if (rate > 0) {
      absl::StrAppendFormat(&line, " %.2f/s", rate);
      if (!final_line) {
        absl::StrAppend(&line, " ETA ",
                        jobs::FormatDuration((total_ - done_) / rate));
      } else {
        absl::StrAppend(&line, " in ", jobs::FormatDuration(elapsed));
      }
    }
    if (tty_) {
      const int width = 24;
      const int filled =
          total_ > 0 ? static_cast<int>(width * done_ / total_) : width;
      std::fprintf(out_, "\r[%s%s] %s%s", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), line.c_str(),
                   final_line ? "\n" : "");
    } else {
      std::fprintf(out_, "%s\n", line.c_str());
    }
    std::fflush(out_);
  }

  std::FILE* out_;
  bool tty_;
  double interval_;
  std::string what_;
  int64_t total_;
  int64_t done_ = 0;
  bool finished_ = false;
  Clock::time_point start_;
  Clock::time_point last_;
};

void Say(const EvalOptions& options, const std::string& text) {
  if (options.progress_out == nullptr) return;
  std::fprintf(options.progress_out, "eval: %s\n", text.c_str());
  std::fflush(options.progress_out);
}

bool Stopped(const EvalOptions& options) {
  return options.should_stop && options.should_stop();
}

absl::Status Cancelled() {
  return absl::CancelledError(
      "eval stopped; run the same command again to continue");
}

bool FileExists(const std::string& path) {
  return ::access(path.c_str(), F_OK) == 0;
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::DataLossError(absl::StrCat(path, ": not valid JSON"));
  }
  return j;
}

absl::Status WriteJson(const std::string& path, const json& j) {
  return WriteFileAtomically(path, j.dump(1) + "\n");
}

absl::Status MakeDir(const std::string& dir) {
  return EnsureWritableDirectory(dir);
}

// ---- data ----

// One query: a held-out image of one source.
struct Query {
  int32_t source = 0;  // index into EvalData::source_names
  int64_t index_in_source = 0;
  std::vector<float> pixels;  // [C, H, W] in [−1, 1]
};

// The training set and the queries. A source is a built-in dataset component
// of the mixture, or one class (sub-folder) of an image-folder component.
struct EvalData {
  data::MixtureSpec spec;
  data::Mixture train;
  std::vector<std::string> source_names;
  std::vector<int32_t> train_source;  // per training image (mixture order)
  std::vector<bool> planted;          // per component
  std::vector<Query> queries;
  bool folder_sources = false;  // some component is an image folder
};

std::string ComponentName(const data::MixtureSpec& spec, const data::Mixture& m,
                          int32_t component) {
  const data::MixtureComponent& c = spec.components[size_t(component)];
  const std::vector<std::string>& names =
      m.source_class_names[size_t(component)];
  std::vector<std::string> classes;
  for (int32_t label : c.classes) {
    classes.push_back(size_t(label) < names.size() &&
                              !names[size_t(label)].empty()
                          ? names[size_t(label)]
                          : absl::StrCat(label));
  }
  std::string name = c.source;
  if (!classes.empty())
    absl::StrAppend(&name, " ", absl::StrJoin(classes, ","));
  return name;
}

std::string ClassName(const data::Mixture& m, int32_t component,
                      int32_t label) {
  const std::vector<std::string>& names =
      m.source_class_names[size_t(component)];
  return size_t(label) < names.size() && !names[size_t(label)].empty()
             ? names[size_t(label)]
             : absl::StrCat("class ", label);
}

// Fills source_names, train_source and planted from the mixture.
void AssignSources(EvalData* d) {
  std::map<std::pair<int32_t, int32_t>, int32_t> index;  // (component, label)
  auto source_of = [&](int32_t component, int32_t label) {
    const bool folder =
        d->spec.components[size_t(component)].source == "folder";
    const std::pair<int32_t, int32_t> key{component, folder ? label : -1};
    auto it = index.find(key);
    if (it != index.end()) return it->second;
    const int32_t i = int32_t(d->source_names.size());
    d->source_names.push_back(
        folder ? ClassName(d->train, component, label)
               : ComponentName(d->spec, d->train, component));
    index.emplace(key, i);
    return i;
  };
  for (size_t c = 0; c < d->spec.components.size(); ++c) {
    d->planted.push_back(d->spec.components[c].fraction.has_value());
    if (d->spec.components[c].source == "folder") {
      d->folder_sources = true;
    } else {
      source_of(int32_t(c), -1);  // built-in components in spec order
    }
  }
  for (const data::SampleProvenance& p : d->train.provenance) {
    d->train_source.push_back(source_of(p.component, p.source_label));
  }
}

// Per built-in component, the first queries_per_source images of the same
// dataset and classes that the mixture does not contain (Fashion-MNIST: from
// the test split).
absl::Status AddHeldOutQueries(const EvalConfig& config,
                               const data::DataLocations& locations,
                               EvalData* d) {
  std::set<std::pair<std::string, int64_t>> trained;
  for (const data::SampleProvenance& p : d->train.provenance) {
    trained.emplace(d->train.sources[size_t(p.component)], p.index_in_source);
  }
  for (size_t i = 0; i < d->spec.components.size(); ++i) {
    data::MixtureSpec held;
    held.shuffle = false;
    data::MixtureComponent c = d->spec.components[i];
    if (c.source == "folder") {
      return absl::InvalidArgumentError(
          "the training data has an image folder; give held-out queries with "
          "--queries DIR (DIR/<class>/<image>, classes named as in training)");
    }
    const std::string name = ComponentName(d->spec, d->train, int32_t(i));
    const int32_t source = int32_t(
        std::find(d->source_names.begin(), d->source_names.end(), name) -
        d->source_names.begin());
    c.limit.reset();
    c.fraction.reset();
    c.label.reset();
    if (c.source == "fashion-mnist") c.split = data::Split::kTest;
    held.components.push_back(c);
    ASSIGN_OR_RETURN(data::Mixture pool, data::BuildMixture(held, locations));
    int64_t taken = 0;
    for (int64_t n = 0;
         n < pool.images.size() && taken < config.queries_per_source; ++n) {
      const data::SampleProvenance& p = pool.provenance[size_t(n)];
      if (trained.count({pool.sources[0], p.index_in_source}) != 0) continue;
      Query q;
      q.source = source;
      q.index_in_source = p.index_in_source;
      absl::Span<const float> image = pool.images.Image(n);
      q.pixels.assign(image.begin(), image.end());
      d->queries.push_back(std::move(q));
      ++taken;
    }
    if (taken < config.queries_per_source) {
      return absl::InvalidArgumentError(
          absl::StrCat("component ", i, " (", name, ") has only ", taken,
                       " held-out images; lower --queries-per-source"));
    }
  }
  return absl::OkStatus();
}

// The first queries_per_source images of each class folder of `root`; every
// class must be a source of the training set.
absl::Status AddFolderQueries(const EvalConfig& config, const std::string& root,
                              EvalData* d) {
  const data::ImageSet& t = d->train.images;
  ASSIGN_OR_RETURN(
      data::ImageSet set,
      data::LoadImageFolder(root, {t.channels, t.height, t.width}));
  std::map<int32_t, int64_t> taken;
  for (int64_t n = 0; n < set.size(); ++n) {
    const int32_t label = set.labels[size_t(n)];
    const std::string& name = set.class_names[size_t(label)];
    auto it = std::find(d->source_names.begin(), d->source_names.end(), name);
    if (it == d->source_names.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--queries: class folder \"", name,
                       "\" is not a class of the "
                       "training set (",
                       absl::StrJoin(d->source_names, ", "), ")"));
    }
    if (taken[label]++ >= config.queries_per_source) continue;
    Query q;
    q.source = int32_t(it - d->source_names.begin());
    q.index_in_source = n;
    absl::Span<const float> image = set.Image(n);
    q.pixels.assign(image.begin(), image.end());
    d->queries.push_back(std::move(q));
  }
  return absl::OkStatus();
}

// The built-in mode: the training mixture of `seed`.
absl::StatusOr<EvalData> LoadEvalData(const EvalConfig& config,
                                      const data::DataLocations& locations,
                                      uint64_t seed) {
  EvalData d;
  ASSIGN_OR_RETURN(d.spec, data::ParseMixtureSpec(config.data));
  d.spec.seed = seed;
  ASSIGN_OR_RETURN(d.train, data::BuildMixture(d.spec, locations));
  AssignSources(&d);
  if (config.queries.empty()) {
    RETURN_IF_ERROR(AddHeldOutQueries(config, locations, &d));
  } else {
    RETURN_IF_ERROR(AddFolderQueries(config, config.queries, &d));
  }
  return d;
}

// The model-description mode: the description's own training data.
absl::StatusOr<EvalData> LoadDescribedData(const EvalConfig& config,
                                           const run::ModelDescription& model,
                                           data::DataLocations locations) {
  EvalData d;
  ASSIGN_OR_RETURN(d.spec, run::TrainingMixtureSpec(model));
  locations.folder_spec = {model.image.channels, model.image.height,
                           model.image.width};
  ASSIGN_OR_RETURN(d.train, run::LoadTrainingData(model, locations));
  AssignSources(&d);
  if (config.queries.empty()) {
    RETURN_IF_ERROR(AddHeldOutQueries(config, locations, &d));
  } else {
    RETURN_IF_ERROR(AddFolderQueries(config, config.queries, &d));
  }
  return d;
}

// ---- training and the store ----

jobs::TrainConfig TrainConfigFor(const EvalConfig& config,
                                 const data::MixtureSpec& spec, uint64_t seed) {
  jobs::TrainConfig t;
  t.dataset_spec = data::FormatMixtureSpec(spec);
  t.dataset_seed = seed;
  t.steps = config.steps;
  t.batch_size = config.batch_size;
  t.checkpoint_every = config.checkpoint_every;
  t.learning_rate = config.learning_rate;
  t.run_seed = seed;
  t.model.base_channels = config.base_channels;
  t.model.norm_groups = config.norm_groups;
  return t;
}

absl::StatusOr<double> TrainIfNeeded(const jobs::TrainConfig& train_config,
                                     const data::ImageSet& images,
                                     const std::vector<int64_t>& ids,
                                     const std::string& run_dir,
                                     const EvalOptions& options,
                                     bool progress) {
  if (FileExists(run_dir + "/model.toml")) return 0.0;
  jobs::TrainOptions t;
  t.run_dir = run_dir;
  t.resume = true;
  t.progress_out = progress ? options.progress_out : nullptr;
  t.progress_is_tty = options.progress_is_tty;
  t.progress_interval_s = options.progress_interval_s;
  t.should_stop = [&options](int64_t) { return Stopped(options); };
  const Clock::time_point start = Clock::now();
  ASSIGN_OR_RETURN(jobs::TrainResult result,
                   jobs::Train(train_config, images, ids, t));
  if (!result.complete) return Cancelled();
  return Seconds(start);
}

absl::StatusOr<double> BuildStoreIfNeeded(const EvalConfig& config,
                                          const EvalData& d, uint64_t seed,
                                          const std::string& run_dir,
                                          const std::string& store_dir,
                                          const EvalOptions& options) {
  if (FileExists(store_dir + "/manifest.json")) return 0.0;
  jobs::StoreBuildConfig b;
  b.dim = config.dim;
  b.num_buckets = config.buckets;
  b.store_seed = seed;
  b.projection_seed = seed;
  jobs::StoreBuildOptions o;
  o.model_path = run_dir;
  o.out_dir = store_dir;
  o.dataset_name = data::FormatMixtureSpec(d.spec);
  o.dataset_seed = d.spec.seed;
  o.dataset_shuffle = d.spec.shuffle;
  for (const data::MixtureComponent& c : d.spec.components) {
    if (c.source == "folder") {
      o.dataset_root = c.path;
      break;
    }
  }
  o.progress_out = options.progress_out;
  o.progress_is_tty = options.progress_is_tty;
  o.progress_interval_s = options.progress_interval_s;
  o.should_stop = [&options](int64_t) { return Stopped(options); };
  const Clock::time_point start = Clock::now();
  ASSIGN_OR_RETURN(jobs::StoreBuildResult result,
                   jobs::BuildStore(b, d.train.images, d.train.sample_ids, o));
  if (!result.complete) return Cancelled();
  return Seconds(start);
}

// ---- the (t, ε) grid ----

// Mean loss of each image over the grid: t_i = floor((i + 1/2)·T/G), and
// for each (image, i, j) a noise from the counter RNG keyed by (kGridSeed,
// image_key + image, i, j). Images: [N, C, H, W]; no gradients.
absl::StatusOr<std::vector<double>> GridLosses(
    model::DiffusionModel& net, const model::NoiseSchedule& schedule,
    model::LossType loss, const at::Tensor& images, const EvalConfig& config,
    uint32_t image_key) {
  at::NoGradGuard no_grad;
  const int64_t n = images.size(0);
  const int64_t numel = images[0].numel();
  const int64_t g = config.grid_timesteps;
  const int64_t r = config.grid_draws;
  const int64_t T = schedule.num_timesteps();
  std::vector<double> sum(static_cast<size_t>(n), 0.0);
  constexpr int64_t kChunk = 128;
  for (int64_t i = 0; i < g; ++i) {
    const int64_t t = (2 * i + 1) * T / (2 * g);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t n0 = 0; n0 < n; n0 += kChunk) {
        const int64_t count = std::min(kChunk, n - n0);
        at::Tensor eps = at::empty({count, numel}, at::kFloat);
        for (int64_t k = 0; k < count; ++k) {
          model::RngKey key;
          key.seed = kGridSeed;
          key.stream = model::RngStream::kQueryNoise;
          key.id0 = image_key + uint32_t(n0 + k);
          key.id1 = uint32_t(i);
          key.id2 = uint32_t(j);
          model::GaussianFill(key, eps[k].data_ptr<float>(), numel);
        }
        at::Tensor x = images.slice(0, n0, n0 + count);
        ASSIGN_OR_RETURN(at::Tensor l,
                         model::DiffusionLoss(net, schedule, loss, x,
                                              at::full({count}, t, at::kLong),
                                              eps.view(x.sizes())));
        const float* values = l.contiguous().data_ptr<float>();
        for (int64_t k = 0; k < count; ++k) sum[size_t(n0 + k)] += values[k];
      }
    }
  }
  for (double& s : sum) s /= double(g * r);
  return sum;
}

at::Tensor ImagesTensor(const data::ImageSet& set) {
  return at::from_blob(const_cast<float*>(set.pixels.data()),
                       {set.size(), set.channels, set.height, set.width},
                       at::kFloat)
      .clone();
}

at::Tensor QueriesTensor(const std::vector<Query>& queries, int64_t c,
                         int64_t h, int64_t w) {
  at::Tensor out = at::empty({int64_t(queries.size()), c, h, w}, at::kFloat);
  for (size_t i = 0; i < queries.size(); ++i) {
    std::copy(queries[i].pixels.begin(), queries[i].pixels.end(),
              out[int64_t(i)].data_ptr<float>());
  }
  return out;
}

// Pixels of the data library's [−1, 1] mapped onto the model's range.
at::Tensor InModelRange(at::Tensor images, const run::ModelDescription& d) {
  run::ToModelRange(d.image, images.data_ptr<float>(), images.numel());
  return images;
}

// Loads the last checkpoint of the model described in `run_dir`.
struct LoadedModel {
  run::ModelDescription description;
  std::unique_ptr<model::DiffusionModel> net;
  model::NoiseSchedule schedule = *model::NoiseSchedule::Create();
  model::LossType loss = model::LossType::kMse;
};

absl::StatusOr<LoadedModel> LoadLastCheckpoint(const std::string& run_dir) {
  LoadedModel m;
  ASSIGN_OR_RETURN(m.description, run::LoadModelDescription(
                                      run_dir, /*verify_checksums=*/false));
  ASSIGN_OR_RETURN(m.schedule,
                   run::CreateNoiseSchedule(m.description.schedule));
  ASSIGN_OR_RETURN(m.loss, run::LossTypeOf(m.description));
  ASSIGN_OR_RETURN(
      m.net, run::LoadCheckpointModel(
                 m.description, int64_t(m.description.checkpoints.size()) - 1));
  return m;
}

// ---- queries: every score of every sample ----

// scores.f32: float32 [Q][columns][N] in store order; columns: the first two
// of kColumns (matched) or all four (matched and replay, when the store has
// a replay slot).
struct QueryScores {
  int64_t queries = 0;
  int64_t samples = 0;
  int columns = kNumColumns;
  std::vector<float> values;
  double featurize_seconds = 0;
  double score_seconds = 0;
  absl::Span<const float> Column(int64_t q, int column) const {
    return absl::MakeConstSpan(values).subspan(
        size_t((q * columns + column) * samples), size_t(samples));
  }
};

absl::StatusOr<QueryScores> ScoreQueries(const EvalData& d,
                                         const std::string& run_dir,
                                         const store::StoreReader& reader,
                                         const EvalConfig& config,
                                         const EvalOptions& options,
                                         const std::string& seed_dir) {
  QueryScores s;
  s.queries = int64_t(d.queries.size());
  s.samples = reader.num_samples();
  s.columns = reader.has_replay() ? kNumColumns : 2;
  const std::string path = seed_dir + "/scores.f32";
  const std::string meta = seed_dir + "/queries.json";
  if (FileExists(meta)) {
    ASSIGN_OR_RETURN(json m, ReadJson(meta));
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
    const size_t expected = size_t(s.queries * s.columns * s.samples);
    if (bytes.size() != expected * sizeof(float)) {
      return absl::DataLossError(absl::StrCat(path, ": ", bytes.size(),
                                              " bytes, expected ",
                                              expected * sizeof(float)));
    }
    s.values.resize(expected);
    std::memcpy(s.values.data(), bytes.data(), bytes.size());
    s.featurize_seconds = m.value("featurize_seconds", 0.0);
    s.score_seconds = m.value("score_seconds", 0.0);
    return s;
  }
  if (s.samples > kMaxRanked) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the eval ranks every sample and supports at most ", kMaxRanked,
        " training samples; the mixture has ", s.samples));
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<service::ModelQueryFeaturizer> featurizer,
      service::ModelQueryFeaturizer::Create(reader.manifest(), run_dir, 1));
  scoring::ScorerOptions scorer_options;
  scorer_options.device = scoring::DeviceChoice::kCpu;
  ASSIGN_OR_RETURN(std::unique_ptr<scoring::Scorer> scorer,
                   scoring::Scorer::Create(&reader, scorer_options));
  s.values.assign(size_t(s.queries * s.columns * s.samples), 0.0f);
  StageProgress progress(options, "queries", s.queries);
  for (int64_t q = 0; q < s.queries; ++q) {
    if (Stopped(options)) return Cancelled();
    const Query& query = d.queries[size_t(q)];
    service::QueryImage image;
    image.channels = d.train.images.channels;
    image.height = d.train.images.height;
    image.width = d.train.images.width;
    image.pixels = query.pixels;
    service::QueryFeatureOptions fo;
    fo.query_timesteps = config.query_timesteps;
    fo.noise_draws = config.noise_draws;
    fo.seed = kQuerySeed;
    Clock::time_point start = Clock::now();
    ASSIGN_OR_RETURN(service::FeaturizedQuery features,
                     featurizer->Featurize(image, fo));
    s.featurize_seconds += Seconds(start);
    const int pairings = s.columns / 2;
    std::vector<scoring::ScoreQuery> batch(static_cast<size_t>(pairings));
    for (int p = 0; p < pairings; ++p) {
      batch[size_t(p)].vectors = features.vectors;
      batch[size_t(p)].plan.pairing =
          p == 0 ? scoring::Pairing::kMatched : scoring::Pairing::kReplay;
      batch[size_t(p)].k = int32_t(s.samples);
    }
    start = Clock::now();
    ASSIGN_OR_RETURN(std::vector<scoring::QueryResult> results,
                     scorer->Score(batch));
    s.score_seconds += Seconds(start);
    for (int p = 0; p < pairings; ++p) {
      const scoring::QueryResult& r = results[size_t(p)];
      for (int m = 0; m < 2; ++m) {
        const scoring::MethodRanking& ranking = m == 0 ? r.tracin : r.retrac;
        float* out = &s.values[size_t((q * s.columns + p * 2 + m) * s.samples)];
        for (const scoring::RankedSample& sample : ranking.proponents) {
          out[sample.index] = sample.score;
        }
      }
    }
    progress.Update(q + 1);
  }
  progress.Finish();
  RETURN_IF_ERROR(WriteFileAtomically(
      path, absl::string_view(reinterpret_cast<const char*>(s.values.data()),
                              s.values.size() * sizeof(float))));
  json m = {{"queries", s.queries},
            {"samples", s.samples},
            {"featurize_seconds", s.featurize_seconds},
            {"score_seconds", s.score_seconds}};
  json list = json::array();
  for (const Query& query : d.queries) {
    list.push_back(
        {{"source", query.source}, {"index_in_source", query.index_in_source}});
  }
  m["list"] = std::move(list);
  RETURN_IF_ERROR(WriteJson(meta, m));
  return s;
}

std::vector<double> ToDouble(absl::Span<const float> values) {
  return std::vector<double>(values.begin(), values.end());
}

json Finite(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

// ---- the analyses of one seed ----

json NormsPart(const store::Manifest& manifest) {
  const json& stats = manifest.diagnostics.at("norm_stats");
  const int64_t num_b = manifest.spec.num_buckets();
  json median = json::array(), p95 = json::array(), ratio = json::array();
  for (size_t c = 0; c < stats.at("median").size(); ++c) {
    json med_c = json::array(), p95_c = json::array();
    double lo = INFINITY, hi = 0;
    for (int64_t b = 0; b < num_b; ++b) {
      const double m = stats["median"][c][size_t(b)].get<double>();
      med_c.push_back(m);
      p95_c.push_back(stats["p95"][c][size_t(b)].get<double>());
      lo = std::min(lo, m);
      hi = std::max(hi, m);
    }
    median.push_back(std::move(med_c));
    p95.push_back(std::move(p95_c));
    ratio.push_back(Finite(hi / lo));
  }
  json steps = json::array();
  for (const auto& c : manifest.spec.model.checkpoints) steps.push_back(c.step);
  return {{"checkpoint_steps", std::move(steps)},
          {"bucket_edges", manifest.spec.buckets.edges},
          {"median", std::move(median)},
          {"p95", std::move(p95)},
          {"max_min_ratio", std::move(ratio)},
          {"spearman_t_norm",
           manifest.diagnostics.value("spearman", json::array())}};
}

json Detector(const std::string& name, const std::vector<double>& scores,
              const std::vector<bool>& positive, int64_t positives) {
  json at = json::object();
  for (int64_t k : {int64_t{10}, int64_t{20}, positives}) {
    at[absl::StrCat(k)] = Finite(PrecisionAtK(scores, positive, k));
  }
  json roc = json::array();
  for (const auto& [fpr, tpr] : RocCurve(scores, positive)) {
    roc.push_back({fpr, tpr});
  }
  return {{"name", name},
          {"auroc", Finite(Auroc(scores, positive))},
          {"average_precision", Finite(AveragePrecision(scores, positive))},
          {"precision_at", std::move(at)},
          {"roc", std::move(roc)}};
}

// Store index → mixture index, by sample id. FAILED_PRECONDITION for a
// store sample the mixture does not contain.
absl::StatusOr<std::vector<int64_t>> StoreToMixture(
    const EvalData& d, const store::StoreReader& reader) {
  std::map<int64_t, int64_t> by_id;
  for (size_t i = 0; i < d.train.sample_ids.size(); ++i) {
    by_id[d.train.sample_ids[i]] = int64_t(i);
  }
  std::vector<int64_t> out(size_t(reader.num_samples()), 0);
  for (const store::SampleBlock& block : reader.shards()) {
    for (int64_t i = 0; i < block.count; ++i) {
      auto it = by_id.find(block.sample_ids[i]);
      if (it == by_id.end()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "store sample ", block.first + i, " has id ", block.sample_ids[i],
            " that the mixture does not contain"));
      }
      out[size_t(block.first + i)] = it->second;
    }
  }
  return out;
}

absl::StatusOr<json> OutliersPart(const EvalData& d,
                                  const store::StoreReader& reader,
                                  const std::vector<int64_t>& to_mixture,
                                  const std::vector<double>& train_loss,
                                  uint64_t seed) {
  const int64_t n = reader.num_samples();
  const size_t count = static_cast<size_t>(n);
  std::vector<bool> positive(count);
  std::vector<double> tracin(count), retrac(count), loss(count), random(count);
  int64_t positives = 0;
  SplitMix64 rng(seed ^ kRandomScoreSeed);
  for (const store::SampleBlock& block : reader.shards()) {
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t s = block.first + i;
      const int64_t m = to_mixture[size_t(s)];
      const int32_t component = d.train.provenance[size_t(m)].component;
      positive[size_t(s)] = d.planted[size_t(component)];
      positives += positive[size_t(s)] ? 1 : 0;
      tracin[size_t(s)] = block.self_influence[2 * i];
      retrac[size_t(s)] = block.self_influence[2 * i + 1];
      loss[size_t(s)] = train_loss[size_t(m)];
      random[size_t(s)] = double(rng.Next() >> 11);
    }
  }
  json detectors = json::array();
  if (positives == 0) {
    return json{{"positives", 0},
                {"samples", n},
                {"detectors", std::move(detectors)},
                {"note",
                 "no planted component (no fraction= in the training "
                 "data), so no outlier detection"}};
  }
  detectors.push_back(
      Detector("TracIn self-influence", tracin, positive, positives));
  detectors.push_back(
      Detector("ReTrac self-influence", retrac, positive, positives));
  detectors.push_back(Detector("per-sample loss", loss, positive, positives));
  detectors.push_back(Detector("random ranking", random, positive, positives));
  return json{{"positives", positives},
              {"samples", n},
              {"detectors", std::move(detectors)}};
}

// Per store sample, the source it came from (index into source_names).
std::vector<int32_t> StoreSources(const EvalData& d,
                                  const std::vector<int64_t>& to_mixture) {
  std::vector<int32_t> out;
  out.reserve(to_mixture.size());
  for (int64_t m : to_mixture) out.push_back(d.train_source[size_t(m)]);
  return out;
}

json TracingPart(const EvalData& d, const std::vector<int32_t>& components,
                 const QueryScores& scores, const EvalConfig& config) {
  json rows = json::array();
  const size_t num_sources = d.source_names.size();
  std::vector<int64_t> counts(num_sources, 0);
  for (int32_t c : components) {
    if (c >= 0) ++counts[size_t(c)];
  }
  for (int column = 0; column < scores.columns; ++column) {
    for (size_t src = 0; src < num_sources; ++src) {
      double own_k = 0, own_wide = 0;
      int64_t queries = 0;
      for (int64_t q = 0; q < scores.queries; ++q) {
        if (d.queries[size_t(q)].source != int32_t(src)) continue;
        ++queries;
        const std::vector<double> col = ToDouble(scores.Column(q, column));
        for (int64_t wide = 0; wide < 2; ++wide) {
          const int64_t k = wide ? config.top_k_wide : config.top_k;
          int64_t own = 0;
          for (int64_t i : TopK(col, k))
            own += components[size_t(i)] == int32_t(src);
          (wide ? own_wide : own_k) +=
              double(own) / double(std::min<int64_t>(k, int64_t(col.size())));
        }
      }
      rows.push_back(
          {{"pairing", kColumns[column].pairing},
           {"method", kColumns[column].method},
           {"source", d.source_names[src]},
           {"queries", queries},
           {"base_rate", double(counts[src]) / double(components.size())},
           {absl::StrCat("top", config.top_k, "_own_share"),
            Finite(queries ? own_k / queries : NAN)},
           {absl::StrCat("top", config.top_k_wide, "_own_share"),
            Finite(queries ? own_wide / queries : NAN)}});
    }
  }
  return rows;
}

const std::vector<double> kTaus = {0.2, 0.5};

json GeneralPart(const QueryScores& scores, const EvalConfig& config) {
  json rows = json::array();
  for (int column = 0; column < scores.columns; ++column) {
    std::vector<std::vector<int64_t>> lists;
    for (int64_t q = 0; q < scores.queries; ++q) {
      lists.push_back(TopK(ToDouble(scores.Column(q, column)), config.top_k));
    }
    const TopListSummary s = SummarizeTopLists(lists, kTaus);
    rows.push_back({{"pairing", kColumns[column].pairing},
                    {"method", kColumns[column].method},
                    {"queries", s.queries},
                    {"k", s.k},
                    {"taus", s.taus},
                    {"generally_influential", s.generally_influential},
                    {"unique", s.unique},
                    {"mean_jaccard", Finite(s.mean_jaccard)},
                    {"histogram", s.histogram}});
  }
  return rows;
}

// ---- (f) LDS ----

// Subset m: exactly round(fraction·N) store indices, a seeded partial
// Fisher–Yates shuffle (SplitMix64 keyed by m), in increasing order.
std::vector<int64_t> LdsSubset(int64_t n, double fraction, int64_t m) {
  std::vector<int64_t> all(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) all[size_t(i)] = i;
  SplitMix64 rng(kLdsSubsetSeed + uint64_t(m) * 0x100000001b3ULL);
  const int64_t keep = std::llround(fraction * double(n));
  for (int64_t i = 0; i < keep; ++i) {
    const int64_t j = i + int64_t(rng.Next() % uint64_t(n - i));
    std::swap(all[size_t(i)], all[size_t(j)]);
  }
  all.resize(size_t(keep));
  std::sort(all.begin(), all.end());
  return all;
}

absl::StatusOr<json> RunLds(const EvalConfig& config,
                            const EvalOptions& options, const EvalData& d,
                            const store::StoreReader& reader,
                            const QueryScores& scores,
                            const std::vector<int64_t>& to_mixture,
                            uint64_t seed) {
  const std::string lds_dir = options.out_dir + "/lds";
  const std::string done = options.out_dir + "/lds.json";
  if (FileExists(done)) return ReadJson(done);
  RETURN_IF_ERROR(MakeDir(lds_dir));
  const int64_t n = reader.num_samples();
  const at::Tensor query_images =
      QueriesTensor(d.queries, d.train.images.channels, d.train.images.height,
                    d.train.images.width);
  std::vector<std::vector<double>> measured;  // [M][Q]
  std::vector<std::vector<int64_t>> subsets;
  double train_seconds = 0, measure_seconds = 0;
  Say(options,
      absl::StrCat("LDS: ", config.lds_models, " models on ",
                   config.lds_fraction * 100, "% subsets of ", n, " samples"));
  StageProgress progress(options, "LDS retraining", config.lds_models);
  for (int64_t m = 0; m < config.lds_models; ++m) {
    if (Stopped(options)) return Cancelled();
    const std::string model_dir = absl::StrCat(lds_dir, "/model-", m);
    const std::string outputs = model_dir + "/outputs.json";
    subsets.push_back(LdsSubset(n, config.lds_fraction, m));
    if (!FileExists(outputs)) {
      RETURN_IF_ERROR(MakeDir(model_dir));
      data::ImageSet subset;
      subset.name = d.train.images.name;
      subset.channels = d.train.images.channels;
      subset.height = d.train.images.height;
      subset.width = d.train.images.width;
      std::vector<int64_t> ids;
      for (int64_t s : subsets.back()) {
        const int64_t i = to_mixture[size_t(s)];
        absl::Span<const float> image = d.train.images.Image(i);
        subset.pixels.insert(subset.pixels.end(), image.begin(), image.end());
        subset.labels.push_back(d.train.images.labels[size_t(i)]);
        ids.push_back(d.train.sample_ids[size_t(i)]);
      }
      // The run records the full mixture's spec (its model.toml must name a
      // loadable data source); run.json's dataset fingerprint and
      // outputs.json's sample list say which half it was trained on.
      const jobs::TrainConfig t = TrainConfigFor(config, d.spec, seed);
      ASSIGN_OR_RETURN(
          double seconds,
          TrainIfNeeded(t, subset, ids, model_dir + "/run", options,
                        /*progress=*/false));
      const Clock::time_point start = Clock::now();
      ASSIGN_OR_RETURN(LoadedModel loaded,
                       LoadLastCheckpoint(model_dir + "/run"));
      ASSIGN_OR_RETURN(
          std::vector<double> losses,
          GridLosses(*loaded.net, loaded.schedule, loaded.loss, query_images,
                     config, /*image_key=*/1u << 20));
      const double measure = Seconds(start);
      RETURN_IF_ERROR(
          WriteJson(outputs, {{"losses", losses},
                              {"subset_store_indices", subsets.back()},
                              {"train_seconds", seconds},
                              {"measure_seconds", measure}}));
    }
    ASSIGN_OR_RETURN(json out, ReadJson(outputs));
    measured.push_back(out.at("losses").get<std::vector<double>>());
    train_seconds += out.value("train_seconds", 0.0);
    measure_seconds += out.value("measure_seconds", 0.0);
    progress.Update(m + 1);
  }
  progress.Finish();

  // Predicted output of subset m for query q: −Σ_{n∈S_m} τ(n, q) (a
  // positive score says training on n lowers the query's loss).
  const int64_t num_q = scores.queries;
  json rows = json::array();
  auto lds_of = [&](auto score_of) {
    std::vector<double> per_query;
    for (int64_t q = 0; q < num_q; ++q) {
      std::vector<double> predicted, actual;
      for (size_t m = 0; m < subsets.size(); ++m) {
        double sum = 0;
        for (int64_t s : subsets[m]) sum += score_of(q, s);
        predicted.push_back(-sum);
        actual.push_back(measured[m][size_t(q)]);
      }
      per_query.push_back(Spearman(predicted, actual));
    }
    return per_query;
  };
  auto row = [&](const std::string& pairing, const std::string& method,
                 const std::vector<double>& per_query) {
    const Interval ci =
        BootstrapMeanInterval(per_query, config.bootstrap_resamples, seed);
    json pq = json::array();
    for (double v : per_query) pq.push_back(Finite(v));
    return json{{"pairing", pairing},
                {"method", method},
                {"mean", Finite(Mean(per_query))},
                {"ci95", {Finite(ci.lo), Finite(ci.hi)}},
                {"per_query", std::move(pq)}};
  };
  for (int column = 0; column < scores.columns; ++column) {
    rows.push_back(row(kColumns[column].pairing, kColumns[column].method,
                       lds_of([&](int64_t q, int64_t s) {
                         return double(scores.Column(q, column)[size_t(s)]);
                       })));
  }
  std::vector<double> random(static_cast<size_t>(num_q * n));
  SplitMix64 rng(kRandomScoreSeed);
  for (double& v : random)
    v = double(rng.Next() >> 11) / 9007199254740992.0 - 0.5;
  rows.push_back(row("-", "random", lds_of([&](int64_t q, int64_t s) {
                       return random[size_t(q * n + s)];
                     })));
  json j = {
      {"seed", seed},
      {"models", config.lds_models},
      {"subset_fraction", config.lds_fraction},
      {"subset_size", subsets.empty() ? 0 : int64_t(subsets[0].size())},
      {"queries", num_q},
      {"grid",
       {{"timesteps", config.grid_timesteps}, {"draws", config.grid_draws}}},
      {"bootstrap_resamples", config.bootstrap_resamples},
      {"train_seconds", train_seconds},
      {"measure_seconds", measure_seconds},
      {"rows", std::move(rows)}};
  RETURN_IF_ERROR(WriteJson(done, j));
  return j;
}

// ---- summary over seeds ----

json GeneralSummary(const json& seeds) {
  json out = json::array();
  const int columns = int(seeds.at(0).at("general").size());
  for (int column = 0; column < columns; ++column) {
    json row = {{"pairing", kColumns[column].pairing},
                {"method", kColumns[column].method}};
    auto stat = [&](const std::string& key, auto get) {
      std::vector<double> v;
      for (const json& s : seeds)
        v.push_back(get(s.at("general")[size_t(column)]));
      row[key] = {{"mean", Finite(Mean(v))},
                  {"sd", Finite(SampleSd(v))},
                  {"values", v}};
    };
    for (size_t t = 0; t < kTaus.size(); ++t) {
      stat(absl::StrFormat("g_%.1f", kTaus[t]), [t](const json& g) {
        return g.at("generally_influential")[t].get<double>();
      });
    }
    stat("unique", [](const json& g) { return g.at("unique").get<double>(); });
    stat("mean_jaccard", [](const json& g) {
      return g.at("mean_jaccard").is_null()
                 ? NAN
                 : g.at("mean_jaccard").get<double>();
    });
    out.push_back(std::move(row));
  }
  // ReTrac / TracIn of |G_0.2| per seed and pairing.
  for (int pairing = 0; pairing < columns / 2; ++pairing) {
    std::vector<double> ratio;
    for (const json& s : seeds) {
      const double tracin = s.at("general")[size_t(pairing * 2)]
                                .at("generally_influential")[0]
                                .get<double>();
      const double retrac = s.at("general")[size_t(pairing * 2 + 1)]
                                .at("generally_influential")[0]
                                .get<double>();
      ratio.push_back(tracin > 0 ? retrac / tracin : NAN);
    }
    out[size_t(pairing * 2 + 1)]["g_0.2_ratio_to_tracin"] = {
        {"mean", Finite(Mean(ratio))}, {"sd", Finite(SampleSd(ratio))}};
  }
  return out;
}

std::string MachineDescription() {
  std::string cpu = "unknown CPU";
  if (absl::StatusOr<std::string> info = ReadFile("/proc/cpuinfo"); info.ok()) {
    const size_t at = info->find("model name");
    if (at != std::string::npos) {
      const size_t colon = info->find(':', at);
      const size_t end = info->find('\n', at);
      if (colon != std::string::npos && colon < end) {
        cpu = info->substr(colon + 2, end - colon - 2);
      }
    }
  }
  return absl::StrCat(std::thread::hardware_concurrency(),
                      " hardware threads, ", cpu);
}

std::string Today() {
  const std::time_t now = std::time(nullptr);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%d %H:%M UTC",
                std::gmtime(&now));
  return buffer;
}

absl::Status MakePlots(const EvalOptions& options, json* report) {
  std::string script = options.plots_script.empty() ? RETRACE_EVAL_PLOTS_SCRIPT
                                                    : options.plots_script;
  if (script.empty() || !FileExists(script)) {
    (*report)["plots"] = {{"error", "the plot script was not found"}};
    return absl::OkStatus();
  }
  const std::string command =
      absl::StrCat("'", options.python, "' '", script, "' '", options.out_dir,
                   "/report.json' '", options.out_dir, "' > '", options.out_dir,
                   "/plots.log' 2>&1");
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    (*report)["plots"] = {
        {"error",
         absl::StrCat("the plot script failed (exit ", rc,
                      "); see plots.log (python3-matplotlib missing?)")}};
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::string log, ReadFile(options.out_dir + "/plots.log"));
  json files = json::array();
  for (absl::string_view line : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
    if (absl::EndsWith(line, ".png")) files.push_back(std::string(line));
  }
  (*report)["plots"] = {{"files", files}};
  return absl::OkStatus();
}

}  // namespace

EvalConfig EvalConfig::Quick() {
  EvalConfig c;
  c.data =
      "fashion-mnist:train:classes=0:limit=60 + "
      "fashion-mnist:train:classes=2:limit=60 + "
      "mnist:classes=0:fraction=0.05";
  c.seeds = {1, 2};
  c.steps = 30;
  c.checkpoint_every = 15;
  c.batch_size = 16;
  c.base_channels = 8;
  c.dim = 128;
  c.buckets = 3;
  c.queries_per_source = 4;
  c.grid_timesteps = 4;
  c.grid_draws = 1;
  c.fidelity_dims = {64, 256};
  c.fidelity_samples = 16;
  c.fidelity_queries = 3;
  c.lds = true;
  c.lds_models = 6;
  c.bootstrap_resamples = 200;
  return c;
}

nlohmann::json EvalConfig::ToJson() const {
  return {{"data", data},
          {"seeds", seeds},
          {"model", model},
          {"queries", queries},
          {"steps", steps},
          {"batch_size", batch_size},
          {"checkpoint_every", checkpoint_every},
          {"learning_rate", learning_rate},
          {"base_channels", base_channels},
          {"norm_groups", norm_groups},
          {"dim", dim},
          {"buckets", buckets},
          {"queries_per_source", queries_per_source},
          {"query_timesteps", query_timesteps},
          {"noise_draws", noise_draws},
          {"query_seed", kQuerySeed},
          {"top_k", top_k},
          {"top_k_wide", top_k_wide},
          {"grid_timesteps", grid_timesteps},
          {"grid_draws", grid_draws},
          {"fidelity", fidelity},
          {"fidelity_dims", fidelity_dims},
          {"fidelity_samples", fidelity_samples},
          {"fidelity_queries", fidelity_queries},
          {"lds", lds},
          {"lds_models", lds_models},
          {"lds_fraction", lds_fraction},
          {"bootstrap_resamples", bootstrap_resamples}};
}

absl::Status RunEval(const EvalConfig& config, const EvalOptions& options) {
  if (config.seeds.empty()) return absl::InvalidArgumentError("no seeds");
  if (config.lds_models < 2 && config.lds) {
    return absl::InvalidArgumentError("--lds-models must be at least 2");
  }
  if (!(config.lds_fraction > 0 && config.lds_fraction < 1)) {
    return absl::InvalidArgumentError("--lds-fraction must be in (0, 1)");
  }
  if (config.queries_per_source < 1 || config.top_k < 1 ||
      config.top_k_wide < config.top_k || config.grid_timesteps < 1 ||
      config.grid_draws < 1) {
    return absl::InvalidArgumentError(
        "queries per source, k and the grid must be positive (and the wide k "
        "at least k)");
  }
  // The model-description mode evaluates a model retrace did not train:
  // nothing is trained, each seed is a store (store and projection seed).
  std::optional<run::ModelDescription> described;
  if (!config.model.empty()) {
    if (config.lds) {
      return absl::InvalidArgumentError(
          "--lds retrains the model on subsets, which retrace can do only for "
          "the built-in UNet it trains itself; drop --lds or --model");
    }
    ASSIGN_OR_RETURN(described, run::LoadModelDescription(
                                    config.model, /*verify_checksums=*/true));
  }
  RETURN_IF_ERROR(MakeDir(options.out_dir));
  const Clock::time_point eval_start = Clock::now();
  const std::string config_path = options.out_dir + "/eval-config.json";
  const json config_json = config.ToJson();
  if (FileExists(config_path)) {
    ASSIGN_OR_RETURN(json saved, ReadJson(config_path));
    if (saved != config_json) {
      return absl::FailedPreconditionError(absl::StrCat(
          options.out_dir, " holds an eval started with other settings (",
          config_path, "); use another --out or the same settings"));
    }
    Say(options, absl::StrCat("continuing the eval in ", options.out_dir));
  } else {
    RETURN_IF_ERROR(WriteJson(config_path, config_json));
  }
  if (options.threads > 0) at::set_num_threads(options.threads);
  data::DataLocations locations =
      data::DataLocationsFrom(options.fashion_mnist_dir, options.mnist_dir);

  json seeds = json::array();
  json timings = json::object();
  json fidelity = nullptr, lds = nullptr;
  json reused = json::array();  // seeds whose analysis this call read back
  for (size_t si = 0; si < config.seeds.size(); ++si) {
    const uint64_t seed = config.seeds[si];
    const std::string seed_dir = absl::StrCat(options.out_dir, "/seed-", seed);
    RETURN_IF_ERROR(MakeDir(seed_dir));
    const std::string analysis_path = seed_dir + "/analysis.json";
    const bool need_first_extras =
        si == 0 &&
        ((config.fidelity && !FileExists(options.out_dir + "/fidelity.json")) ||
         (config.lds && !FileExists(options.out_dir + "/lds.json")));
    json analysis;
    if (FileExists(analysis_path) && !need_first_extras) {
      ASSIGN_OR_RETURN(analysis, ReadJson(analysis_path));
      seeds.push_back(analysis);
      reused.push_back(seed);
      timings[absl::StrCat("seed_", seed)] = analysis.at("timings");
      if (si == 0) {
        if (config.fidelity) {
          ASSIGN_OR_RETURN(fidelity,
                           ReadJson(options.out_dir + "/fidelity.json"));
        }
        if (config.lds) {
          ASSIGN_OR_RETURN(lds, ReadJson(options.out_dir + "/lds.json"));
        }
      }
      continue;
    }
    Say(options, absl::StrCat("seed ", seed, " (", si + 1, " of ",
                              config.seeds.size(), "): loading data"));
    EvalData d;
    if (described.has_value()) {
      ASSIGN_OR_RETURN(d, LoadDescribedData(config, *described, locations));
    } else {
      ASSIGN_OR_RETURN(d, LoadEvalData(config, locations, seed));
    }
    const std::string run_dir =
        described.has_value() ? config.model : seed_dir + "/run";
    const std::string store_dir = seed_dir + "/store";
    json t = json::object();
    double train_s = 0;
    if (!described.has_value()) {
      Say(options,
          absl::StrCat("seed ", seed, ": training on ", d.train.images.size(),
                       " images (", config.steps, " steps)"));
      ASSIGN_OR_RETURN(
          train_s,
          TrainIfNeeded(TrainConfigFor(config, d.spec, seed), d.train.images,
                        d.train.sample_ids, run_dir, options, true));
    }
    Say(options, absl::StrCat("seed ", seed, ": building the store"));
    ASSIGN_OR_RETURN(
        double build_s,
        BuildStoreIfNeeded(config, d, seed, run_dir, store_dir, options));
    store::StoreReaderOptions reader_options;
    reader_options.verify_checksums = false;
    ASSIGN_OR_RETURN(std::unique_ptr<store::StoreReader> reader,
                     store::StoreReader::Open(store_dir, reader_options));
    Say(options, absl::StrCat("seed ", seed, ": attributing ", d.queries.size(),
                              " held-out queries"));
    ASSIGN_OR_RETURN(
        QueryScores scores,
        ScoreQueries(d, run_dir, *reader, config, options, seed_dir));
    if (Stopped(options)) return Cancelled();
    Say(options, absl::StrCat("seed ", seed, ": analyses"));
    Clock::time_point start = Clock::now();
    ASSIGN_OR_RETURN(LoadedModel loaded, LoadLastCheckpoint(run_dir));
    const at::Tensor train_images =
        InModelRange(ImagesTensor(d.train.images), loaded.description);
    ASSIGN_OR_RETURN(std::vector<double> train_loss,
                     GridLosses(*loaded.net, loaded.schedule, loaded.loss,
                                train_images, config, /*image_key=*/0));
    const double loss_s = Seconds(start);
    analysis = json::object();
    analysis["seed"] = seed;
    analysis["samples"] = reader->num_samples();
    analysis["sources"] = d.source_names;
    analysis["norms"] = NormsPart(reader->manifest());
    ASSIGN_OR_RETURN(const std::vector<int64_t> to_mixture,
                     StoreToMixture(d, *reader));
    ASSIGN_OR_RETURN(analysis["outliers"],
                     OutliersPart(d, *reader, to_mixture, train_loss, seed));
    const std::vector<int32_t> components = StoreSources(d, to_mixture);
    analysis["tracing"] = TracingPart(d, components, scores, config);
    analysis["general"] = GeneralPart(scores, config);
    const double attribution_s =
        scores.featurize_seconds + scores.score_seconds;
    if (train_s > 0) t["train_seconds"] = train_s;
    if (build_s > 0) t["build_seconds"] = build_s;
    t["queries"] = scores.queries;
    t["featurize_seconds"] = scores.featurize_seconds;
    t["score_seconds"] = scores.score_seconds;
    t["queries_per_second"] = Finite(double(scores.queries) / attribution_s);
    t["loss_baseline_seconds"] = loss_s;
    analysis["timings"] = t;

    if (si == 0 && config.fidelity) {
      const std::string path = options.out_dir + "/fidelity.json";
      if (FileExists(path)) {
        ASSIGN_OR_RETURN(fidelity, ReadJson(path));
      } else {
        Say(options, "projection fidelity against full gradients");
        FidelityOptions fo;
        fo.dims = config.fidelity_dims;
        fo.train_samples =
            std::min<int64_t>(config.fidelity_samples, reader->num_samples());
        fo.top_k = std::min<int64_t>(config.top_k, fo.train_samples);
        fo.query_timesteps = config.query_timesteps;
        fo.noise_draws = config.noise_draws;
        fo.request_seed = kQuerySeed;
        // The first queries of each source, in turn.
        std::vector<std::vector<size_t>> by_source(d.source_names.size());
        for (size_t i = 0; i < d.queries.size(); ++i) {
          by_source[size_t(d.queries[i].source)].push_back(i);
        }
        std::vector<Query> picked;
        for (size_t round = 0; picked.size() < size_t(config.fidelity_queries);
             ++round) {
          bool any = false;
          for (const std::vector<size_t>& list : by_source) {
            if (round < list.size() &&
                picked.size() < size_t(config.fidelity_queries)) {
              picked.push_back(d.queries[list[round]]);
              any = true;
            }
          }
          if (!any) break;
        }
        // Training images in store order.
        at::Tensor ordered = at::empty_like(train_images);
        for (size_t s = 0; s < to_mixture.size(); ++s) {
          ordered[int64_t(s)].copy_(train_images[to_mixture[s]]);
        }
        ASSIGN_OR_RETURN(
            FidelityResult r,
            MeasureProjectionFidelity(
                loaded.description, reader->manifest(), ordered,
                InModelRange(
                    QueriesTensor(picked, d.train.images.channels,
                                  d.train.images.height, d.train.images.width),
                    loaded.description),
                fo));
        json rows = json::array();
        for (const FidelityRow& row : r.rows) {
          rows.push_back({{"dim", row.dim},
                          {"method", row.method},
                          {"spearman_mean", Finite(row.spearman_mean)},
                          {"spearman_min", Finite(row.spearman_min)},
                          {"recall_mean", Finite(row.recall_mean)},
                          {"recall_min", Finite(row.recall_min)}});
        }
        fidelity = {{"seed", seed},
                    {"train_samples", r.train_samples},
                    {"queries", r.queries},
                    {"parameters", r.parameters},
                    {"top_k", fo.top_k},
                    {"max_norm_rel_error", r.max_norm_rel_error},
                    {"seconds", r.seconds},
                    {"rows", std::move(rows)}};
        RETURN_IF_ERROR(WriteJson(path, fidelity));
      }
    }
    if (si == 0 && config.lds) {
      ASSIGN_OR_RETURN(
          lds, RunLds(config, options, d, *reader, scores, to_mixture, seed));
    }
    RETURN_IF_ERROR(WriteJson(analysis_path, analysis));
    timings[absl::StrCat("seed_", seed)] = t;
    seeds.push_back(std::move(analysis));
  }

  json report = {{"format", "retrace-eval-report"},
                 {"version", 1},
                 {"created", Today()},
                 {"machine", MachineDescription()},
                 {"command", options.command_line},
                 {"config", config_json},
                 {"seeds", seeds},
                 {"general_summary", GeneralSummary(seeds)},
                 {"timings", timings},
                 {"reused_seeds", reused}};
  if (!fidelity.is_null()) report["fidelity"] = fidelity;
  if (!lds.is_null()) report["lds"] = lds;
  report["timings"]["this_call_seconds"] = Seconds(eval_start);
  RETURN_IF_ERROR(WriteJson(options.out_dir + "/report.json", report));
  RETURN_IF_ERROR(MakePlots(options, &report));
  RETURN_IF_ERROR(WriteJson(options.out_dir + "/report.json", report));
  RETURN_IF_ERROR(WriteFileAtomically(options.out_dir + "/report.md",
                                      RenderReportMarkdown(report)));
  Say(options,
      absl::StrCat("report written to ", options.out_dir, "/report.md"));
  return absl::OkStatus();
}

}  // namespace retrace::eval

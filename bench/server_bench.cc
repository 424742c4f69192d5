// retraced over loopback (scripts/bench.sh server): closed-loop gRPC clients
// against retraced's stack (ServerStack: store -> Scorer -> Batcher ->
// AttributionEngine -> AttributionService -> GrpcServer on 127.0.0.1) in
// this process, at
// each concurrency c, and in the same run the scan of a batch of c queries
// with Scorer::Score directly, while the server is idle.
//
//   vectors  precomputed query_vectors (top_k 10) on a synthetic store of
//            random unit vectors, fp16, with a replay slot
//   image    PNG queries (1 query timestep, 2 noise draws) featurized by
//            ModelQueryFeaturizer (2 workers, LibTorch at 1 intra-op thread
//            so that the workers do not oversubscribe the cores), on a tiny
//            run trained here and its store, or on --run RUN --store STORE
//
// Each client has its own channel (and connection), sends its next request
// when the last one returns, and runs for at least --seconds and --rounds
// requests after --warmup unrecorded ones. Google Benchmark runs, one
// iteration each, with manual time:
//   PART/scan/batch:c   the median of --scan-reps scans of c queries
//   PART/server/c:c     the p99 request latency (counters: qps, p50_ms,
//                       p99_ms, requests)
// Then a summary table, where the time went (the server's stage timings of
// AttributeResponse.timings, means over all requests and over the slowest
// 1%), and
//   RATIO server_p99_vs_scan   vectors p99 at concurrency 32 / scan of a
//                              batch of 32 (target: <= 2)
// 32 is the batcher's max batch (retraced's default), so at 32 clients a
// request can ride in a full batch: the batch size the server is built for.
// The vectors ratios at every concurrency are printed as plain lines.
// With --shards n, the vectors store is also served by n shard stacks
// (--role shard, part i/n) behind a router stack (--role router), all in this
// process, and the same clients call the router:
//   routed/server/c:c          the router's p99
//   RATIO router_p99_vs_single routed p99 / vectors p99 at concurrency 32
//                              (the router's overhead; aim <= 1.25)
// Each shard scans on its share of the cores, max(1, cores / n) threads
// (--shard-threads T sets it; 0 = all cores for every shard), so that the
// shards together use what the single server uses.
//
//   server_bench [--n 20000] [--checkpoints 3] [--buckets 5] [--dim 512]
//                [--concurrency 1,8,32] [--seconds 3] [--rounds 10]
//                [--soak-windows 6]
//                [--warmup 2] [--scan-reps 5] [--max-queue-delay-us 2000]
//                [--workers 2] [--run RUN --store STORE] [--shards 4]
//                [--shard-threads T]
//                [--benchmark_filter=vectors]
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "bench/bench_util.h"
#include "bench/ratio_reporter.h"
#include "common/allocator.h"
#include "common/status.h"
#include "jobs/build_store.h"
#include "jobs/train.h"
#include "kernels/device.h"
#include "retrace/v1/attribution.grpc.pb.h"
#include "server/data/image_folder.h"
#include "server/data/mixture.h"
#include "server/scoring/scorer.h"
#include "server/stack/server_stack.h"
#include "server/store/store_writer.h"

namespace retrace::bench {
namespace {

namespace fs = std::filesystem;

constexpr int32_t kMaxBatch = 32;  // retraced's default --max-batch
constexpr int kRatioConcurrency = kMaxBatch;
constexpr int32_t kTopK = 10;
constexpr int kVariants = 64;  // distinct queries the clients cycle through

// Resident set size of this process (server and clients), in MB; -1 when
// /proc/self/status cannot be read.
double ResidentMegabytes() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return -1;
  char line[256];
  double kb = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::sscanf(line, "VmRSS: %lf kB", &kb) == 1) break;
  }
  std::fclose(f);
  return kb < 0 ? -1 : kb / 1024.0;
}

constexpr int kSoakClients = 8;

struct Args {
  int64_t n = 20000;
  int32_t checkpoints = 3;
  int32_t buckets = 5;
  int32_t dim = 512;
  std::vector<int> concurrency = {1, 8, 32};
  double seconds = 3;
  int rounds = 10;
  int warmup = 2;
  int scan_reps = 5;
  int64_t max_queue_delay_us = 2000;
  int workers = 2;
  std::string run_dir;
  std::string store_dir;
  // The soak after the benchmarks: this many load windows (of --seconds
  // each) of the vectors part at kSoakClients, resident memory after each.
  int soak_windows = 6;
  // --shards n: also the vectors store behind a router and n shard stacks
  // (retraced --role router / --role shard) in this process.
  int shards = 0;
  // Scan threads of each shard (retraced --threads): -1 (the default) gives
  // each shard its share of the cores, max(1, cores / shards), as an
  // operator co-locating shards on one node would; 0 lets every shard use
  // all cores.
  int shard_threads = -1;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i += 2) {
    const std::string f = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "flag %s needs a value\n", f.c_str());
      std::exit(2);
    }
    const char* v = argv[i + 1];
    if (f == "--n") {
      a.n = std::atoll(v);
    } else if (f == "--checkpoints") {
      a.checkpoints = std::atoi(v);
    } else if (f == "--buckets") {
      a.buckets = std::atoi(v);
    } else if (f == "--dim") {
      a.dim = std::atoi(v);
    } else if (f == "--seconds") {
      a.seconds = std::atof(v);
    } else if (f == "--rounds") {
      a.rounds = std::atoi(v);
    } else if (f == "--warmup") {
      a.warmup = std::atoi(v);
    } else if (f == "--scan-reps") {
      a.scan_reps = std::max(1, std::atoi(v));
    } else if (f == "--max-queue-delay-us") {
      a.max_queue_delay_us = std::atoll(v);
    } else if (f == "--workers") {
      a.workers = std::atoi(v);
    } else if (f == "--run") {
      a.run_dir = v;
    } else if (f == "--store") {
      a.store_dir = v;
    } else if (f == "--shards") {
      a.shards = std::max(0, std::atoi(v));
    } else if (f == "--shard-threads") {
      a.shard_threads = std::max(0, std::atoi(v));
    } else if (f == "--soak-windows") {
      a.soak_windows = std::max(0, std::atoi(v));
    } else if (f == "--concurrency") {
      a.concurrency.clear();
      for (const char* p = v; *p;) {
        a.concurrency.push_back(std::atoi(p));
        while (*p && *p != ',') ++p;
        if (*p == ',') ++p;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      std::exit(2);
    }
  }
  if (a.run_dir.empty() != a.store_dir.empty()) {
    std::fprintf(stderr, "--run and --store go together\n");
    std::exit(2);
  }
  return a;
}

float Uniform(uint64_t key) {  // [-1, 1)
  return (int64_t(SplitMix(key) >> 40) - (1 << 23)) / float(1 << 23);
}

// A fresh directory under the system's temporary directory, removed with
// everything in it on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_((fs::temp_directory_path() / ("retrace-server-bench-" + name +
                                            "-" + std::to_string(::getpid())))
                  .string()) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Random unit vectors, C checkpoints x (B buckets + replay) slots x D, fp16.
absl::Status WriteSyntheticStore(const Args& a, const std::string& dir) {
  store::StoreSpec spec;
  spec.model.architecture = "synthetic";
  for (int32_t c = 0; c < a.checkpoints; ++c) {
    store::CheckpointInfo ck;
    ck.file = "checkpoint-" + std::to_string(c) + ".pt";
    char hex[65];
    for (int w = 0; w < 4; ++w) {
      std::snprintf(hex + 16 * w, 17, "%016llx",
                    static_cast<unsigned long long>(SplitMix(c * 4 + w)));
    }
    ck.sha256 = hex;
    ck.step = 100 * (c + 1);
    spec.model.checkpoints.push_back(ck);
  }
  const int64_t t = spec.noise_schedule.timesteps;
  for (int32_t b = 0; b <= a.buckets; ++b) {
    spec.buckets.edges.push_back(t * b / a.buckets);
  }
  spec.buckets.replay = true;
  spec.projection.dim = a.dim;
  spec.projection.sparsity = 1;
  spec.projection.input_dim = 100000;
  spec.dtype = kernels::DType::kF16;
  spec.dataset = {{"name", "synthetic"}, {"store_seed", 1u}};
  ASSIGN_OR_RETURN(auto writer, store::StoreWriter::Create(dir, spec));

  const int64_t slots = int64_t{a.checkpoints} * spec.num_slots();
  std::vector<float> vectors(static_cast<size_t>(slots * a.dim));
  std::vector<float> norms(static_cast<size_t>(slots));
  std::vector<int32_t> timesteps(static_cast<size_t>(a.checkpoints));
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t s = 0; s < slots; ++s) {
      float* v = vectors.data() + s * a.dim;
      double sum = 0;
      for (int32_t d = 0; d < a.dim; ++d) {
        v[d] = Uniform((n * slots + s) * a.dim + d);
        sum += double{v[d]} * v[d];
      }
      const float inv = static_cast<float>(1 / std::sqrt(sum));
      for (int32_t d = 0; d < a.dim; ++d) v[d] *= inv;
      norms[s] = 0.5f + 0.5f * std::abs(Uniform(~(n * slots + s)));
    }
    for (int32_t c = 0; c < a.checkpoints; ++c) {
      timesteps[c] = static_cast<int32_t>(SplitMix(n * 31 + c) % t);
    }
    store::SampleRecord record;
    record.sample_id = n;
    record.label = static_cast<int32_t>(n % 10);
    record.vectors = vectors;
    record.norms = norms;
    record.train_timesteps = timesteps;
    RETURN_IF_ERROR(writer->Append(record));
  }
  return writer->Finish().status();
}

// A tiny UNet trained for 10 steps on 40 synthetic 28x28 PNGs under root,
// and its store (D = 64, 4 buckets).
absl::Status MakeTinyRun(const std::string& root, const std::string& run_dir,
                         const std::string& store_dir) {
  const std::string images = root + "/images";
  for (int n = 0; n < 40; ++n) {
    const std::string cls = n % 2 == 0 ? "a" : "b";
    fs::create_directories(images + "/" + cls);
    std::vector<float> pixels(28 * 28);
    for (int y = 0; y < 28; ++y) {
      for (int x = 0; x < 28; ++x) {
        pixels[y * 28 + x] = static_cast<float>(std::sin(0.3 * x + 0.7 * n) *
                                                std::cos(0.2 * y - 0.1 * n));
      }
    }
    ASSIGN_OR_RETURN(std::string png,
                     data::EncodePng(pixels.data(), 1, 28, 28));
    char name[32];
    std::snprintf(name, sizeof(name), "/%03d.png", n);
    std::ofstream(images + "/" + cls + name, std::ios::binary) << png;
  }
  ASSIGN_OR_RETURN(data::MixtureSpec spec,
                   data::ParseMixtureSpec("folder:path=" + images));
  spec.seed = 3;
  ASSIGN_OR_RETURN(data::Mixture mixture, data::BuildMixture(spec));

  jobs::TrainConfig train;
  train.dataset_spec = data::FormatMixtureSpec(spec);
  train.dataset_seed = spec.seed;
  train.model.base_channels = 4;
  train.model.channel_mults = {1, 2};
  train.model.attention = false;
  train.model.norm_groups = 2;
  train.batch_size = 8;
  train.steps = 10;
  train.checkpoint_every = 4;
  train.run_seed = 7;
  jobs::TrainOptions train_options;
  train_options.run_dir = run_dir;
  train_options.threads = 1;
  RETURN_IF_ERROR(
      jobs::Train(train, mixture.images, mixture.sample_ids, train_options)
          .status());

  jobs::StoreBuildConfig build;
  build.dim = 64;
  build.sparsity = 2;
  build.projection_seed = 11;
  build.store_seed = 5;
  build.num_buckets = 4;
  jobs::StoreBuildOptions build_options;
  build_options.model_path = run_dir;
  build_options.out_dir = store_dir;
  build_options.dataset_name = train.dataset_spec;
  build_options.dataset_seed = spec.seed;
  build_options.threads = 1;
  return jobs::BuildStore(build, mixture.images, mixture.sample_ids,
                          build_options)
      .status();
}

// retraced's stack (server/stack/server_stack.h) in this process, serving
// `store_dir` (with the run's model when run_dir is set) on
// 127.0.0.1:<free port>; and the queries the clients and the direct scans
// use.
class Part {
 public:
  static absl::StatusOr<std::unique_ptr<Part>> Create(
      const std::string& store_dir, const std::string& run_dir, const Args& a,
      std::unique_ptr<TempDir> temp) {
    std::unique_ptr<Part> p(new Part);
    p->temp_ = std::move(temp);
    p->store_dir_ = store_dir;
    ASSIGN_OR_RETURN(p->stack_,
                     stack::ServerStack::Create(Config(store_dir, run_dir, a)));
    p->stack_->Start();
    RETURN_IF_ERROR(p->MakeQueries(p->stack_->scorer().shape()));
    return p;
  }

  // `store_dir` split over `shards` shard stacks (--role shard, part i of
  // n) behind a router stack (--role router), which the clients call.
  static absl::StatusOr<std::unique_ptr<Part>> CreateRouted(
      const std::string& store_dir, int shards, const Args& a) {
    std::unique_ptr<Part> p(new Part);
    p->store_dir_ = store_dir;
    std::vector<std::string> addresses;
    for (int i = 0; i < shards; ++i) {
      stack::ServerConfig config = Config(store_dir, "", a);
      config.role = "shard";
      config.shard_part = std::to_string(i) + "/" + std::to_string(shards);
      config.threads = ShardThreads(a);
      ASSIGN_OR_RETURN(std::unique_ptr<stack::ServerStack> shard,
                       stack::ServerStack::Create(config));
      shard->Start();
      addresses.push_back("127.0.0.1:" + std::to_string(shard->port()));
      p->shards_.push_back(std::move(shard));
    }
    stack::ServerConfig config = Config("", "", a);
    config.role = "router";
    config.shards = absl::StrJoin(addresses, ",");
    ASSIGN_OR_RETURN(p->stack_, stack::ServerStack::Create(config));
    p->stack_->Start();
    RETURN_IF_ERROR(p->MakeQueries(p->shards_[0]->scorer().shape()));
    return p;
  }

  static int ShardThreads(const Args& a) {
    if (a.shard_threads >= 0) return a.shard_threads;
    return std::max(1, retrace::kernels::CpuThreads() / std::max(1, a.shards));
  }

  static stack::ServerConfig Config(const std::string& store_dir,
                                    const std::string& run_dir, const Args& a) {
    stack::ServerConfig config;
    config.store_dir = store_dir;
    config.model_path = run_dir;
    config.verify_checksums = false;  // just written, or trusted
    config.thumbnails = false;        // no request asks for them
    config.listen = "127.0.0.1:0";
    config.metrics_port = -1;
    config.device = "cpu";
    config.featurize_device = "cpu";
    config.workers = a.workers;
    config.max_batch = kMaxBatch;
    config.max_queue_delay_us = a.max_queue_delay_us;
    return config;
  }

  ~Part() {
    if (stack_ != nullptr) stack_->Shutdown(absl::Seconds(5));
  }

  std::string address() const {
    return "127.0.0.1:" + std::to_string(stack_->port());
  }
  const std::string& store_dir() const { return store_dir_; }
  const std::vector<v1::AttributeRequest>& requests() const {
    return requests_;
  }

  // Median seconds of `reps` scans of a batch of `batch` queries (after one
  // unrecorded scan).
  absl::StatusOr<double> ScanSeconds(int batch, int reps) {
    std::vector<scoring::ScoreQuery> queries(static_cast<size_t>(batch));
    for (int i = 0; i < batch; ++i) {
      queries[i].vectors = scan_vectors_[i % scan_vectors_.size()];
      queries[i].k = kTopK;
    }
    std::vector<double> times;
    for (int rep = 0; rep <= reps; ++rep) {
      const double t0 = Now();
      RETURN_IF_ERROR(stack_->scorer().Score(queries).status());
      if (rep > 0) times.push_back(Now() - t0);
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  }

 private:
  Part() = default;

  // Vectors: kVariants random [C, B, D] queries, sent as query_vectors and
  // scanned directly. Image: kVariants PNG patterns not in the training set
  // (scanned as random vectors: the scan's time does not depend on values).
  absl::Status MakeQueries(const scoring::StoreShape& shape) {
    service::QueryFeaturizer* featurizer = stack_->featurizer();
    const int64_t size =
        int64_t{shape.num_checkpoints} * shape.num_buckets * shape.dim;
    for (int v = 0; v < kVariants; ++v) {
      scoring::BucketQuery q;
      q.raw.resize(static_cast<size_t>(size));
      q.unit.resize(static_cast<size_t>(size));
      for (int64_t i = 0; i < size; ++i) {
        q.raw[i] = Uniform((uint64_t{1} << 60) + v * size + i);
        q.unit[i] = Uniform((uint64_t{2} << 60) + v * size + i);
      }
      v1::AttributeRequest request;
      request.set_top_k(kTopK);
      if (featurizer == nullptr) {
        v1::QueryVectors* qv = request.mutable_query_vectors();
        qv->set_num_checkpoints(shape.num_checkpoints);
        qv->set_num_slots(shape.num_buckets);
        qv->set_dim(static_cast<int32_t>(shape.dim));
        qv->mutable_raw()->Add(q.raw.begin(), q.raw.end());
        qv->mutable_unit()->Add(q.unit.begin(), q.unit.end());
      } else {
        const std::vector<int64_t> chw = featurizer->image_shape();
        std::vector<float> pixels(
            static_cast<size_t>(chw[0] * chw[1] * chw[2]));
        for (size_t i = 0; i < pixels.size(); ++i) {
          const int64_t x = i % chw[2], y = (i / chw[2]) % chw[1];
          pixels[i] = static_cast<float>(std::sin(0.25 * x + 0.9 * v) *
                                         std::cos(0.15 * y + 0.3 * v));
        }
        ASSIGN_OR_RETURN(std::string png, data::EncodePng(pixels.data(), chw[0],
                                                          chw[1], chw[2]));
        request.set_image(std::move(png));
        request.set_query_timesteps(1);
        request.set_query_noise_draws(2);
        request.set_seed(static_cast<uint64_t>(v));
      }
      requests_.push_back(std::move(request));
      scan_vectors_.push_back(std::move(q));
    }
    return absl::OkStatus();
  }

  // Destroyed last: the store's files live there.
  std::unique_ptr<TempDir> temp_;
  std::string store_dir_;
  // A routed part's shards, destroyed after the router (stack_).
  std::vector<std::unique_ptr<stack::ServerStack>> shards_;
  std::unique_ptr<stack::ServerStack> stack_;
  std::vector<v1::AttributeRequest> requests_;
  std::vector<scoring::BucketQuery> scan_vectors_;
};

// A part made on first use, so that a --benchmark_filter that leaves it out
// costs nothing.
class LazyPart {
 public:
  using Factory = std::function<absl::StatusOr<std::unique_ptr<Part>>()>;
  explicit LazyPart(Factory make) : make_(std::move(make)) {}

  absl::StatusOr<Part*> Get() {
    if (!made_) {
      made_ = true;
      auto part = make_();
      if (part.ok()) {
        part_ = std::move(*part);
      } else {
        status_ = part.status();
      }
    }
    if (!status_.ok()) return status_;
    return part_.get();
  }

 private:
  Factory make_;
  bool made_ = false;
  absl::Status status_;
  std::unique_ptr<Part> part_;
};

// One request as the client saw it, and the server's stage times for it
// (AttributeResponse.timings), in seconds.
struct Sample {
  double latency = 0;
  double featurize = 0, queue = 0, score = 0;
};

// Stage means over a set of requests; the rest of their latency is gRPC,
// decoding, selection and the client.
struct Stages {
  double featurize = 0, queue = 0, score = 0, latency = 0;

  static Stages Mean(const std::vector<Sample>& samples, size_t from) {
    Stages m;
    const double count = static_cast<double>(samples.size() - from);
    for (size_t i = from; i < samples.size(); ++i) {
      m.featurize += samples[i].featurize / count;
      m.queue += samples[i].queue / count;
      m.score += samples[i].score / count;
      m.latency += samples[i].latency / count;
    }
    return m;
  }
};

struct LoadResult {
  int64_t requests = 0;
  int64_t errors = 0;
  std::string first_error;
  double seconds = 0;
  double qps = 0, p50 = 0, p99 = 0;
  Stages all;      // every request
  Stages slowest;  // the requests at or above the p99
};

LoadResult RunLoad(const Part& part, int clients, const Args& a) {
  std::mutex mutex;
  std::condition_variable changed;
  int ready = 0;
  bool go = false;
  double start = 0;
  std::vector<std::vector<Sample>> samples(static_cast<size_t>(clients));
  std::vector<double> ends(static_cast<size_t>(clients));
  std::atomic<int64_t> errors{0};
  std::string first_error;

  auto client = [&](int id) {
    grpc::ChannelArguments args;
    // Its own connection rather than one shared by every channel.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    auto stub = v1::Attribution::NewStub(grpc::CreateCustomChannel(
        part.address(), grpc::InsecureChannelCredentials(), args));
    const auto& requests = part.requests();
    int64_t next = id;
    auto call = [&] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::seconds(60));
      v1::AttributeResponse response;
      Sample sample;
      const double t0 = Now();
      const grpc::Status status = stub->Attribute(
          &context, requests[next++ % requests.size()], &response);
      sample.latency = Now() - t0;
      if (!status.ok() && errors.fetch_add(1) == 0) {
        std::lock_guard<std::mutex> lock(mutex);
        first_error =
            std::to_string(status.error_code()) + ": " + status.error_message();
      }
      for (const v1::StageTiming& t : response.timings()) {
        const double seconds = t.milliseconds() * 1e-3;
        // The table's "featurize" column is the query side whole: the
        // gradients and their projection.
        if (t.stage() == "featurize" || t.stage() == "project") {
          sample.featurize += seconds;
        }
        if (t.stage() == "queue") sample.queue = seconds;
        if (t.stage() == "score") sample.score = seconds;
      }
      return sample;
    };
    for (int i = 0; i < a.warmup; ++i) call();
    {
      std::unique_lock<std::mutex> lock(mutex);
      ++ready;
      changed.notify_all();
      changed.wait(lock, [&] { return go; });
    }
    std::vector<Sample>& mine = samples[id];
    for (;;) {
      mine.push_back(call());
      const double now = Now();
      if (now - start >= a.seconds && int(mine.size()) >= a.rounds) {
        ends[id] = now;
        break;
      }
    }
  };

  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) threads.emplace_back(client, i);
  {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return ready == clients; });
    errors = 0;  // warm-up errors show again in the measured requests
    first_error.clear();
    start = Now();
    go = true;
  }
  changed.notify_all();
  for (auto& t : threads) t.join();

  LoadResult r;
  std::vector<Sample> all;
  for (const auto& s : samples) all.insert(all.end(), s.begin(), s.end());
  std::sort(all.begin(), all.end(), [](const Sample& x, const Sample& y) {
    return x.latency < y.latency;
  });
  // Nearest rank: the smallest latency with at least q of them at or below.
  auto rank = [&](double q) {
    return std::max<size_t>(static_cast<size_t>(std::ceil(q * all.size())), 1) -
           1;
  };
  r.requests = static_cast<int64_t>(all.size());
  r.errors = errors;
  r.first_error = first_error;
  r.seconds = *std::max_element(ends.begin(), ends.end()) - start;
  r.qps = r.requests / r.seconds;
  r.p50 = all[rank(0.50)].latency;
  r.p99 = all[rank(0.99)].latency;
  r.all = Stages::Mean(all, 0);
  r.slowest = Stages::Mean(all, rank(0.99));
  return r;
}

// What the summary table shows, by part and concurrency.
struct Row {
  double scan = -1;
  LoadResult load;
  bool loaded = false;
};
struct Results {
  std::map<std::string, std::map<int, Row>> rows;
  bool failed = false;  // some run reported an error: exit status 1
};

void RegisterPart(const std::string& name, LazyPart* lazy, const Args& a,
                  Results* results, bool with_scan = true) {
  auto fail = [results](benchmark::State& state, const std::string& error) {
    state.SkipWithError(error.c_str());
    results->failed = true;
  };
  for (int c : a.concurrency) {
    if (with_scan) {
      benchmark::RegisterBenchmark(
          (name + "/scan/batch:" + std::to_string(c)).c_str(),
          [=](benchmark::State& state) {
            auto part = lazy->Get();
            if (!part.ok()) {
              fail(state, part.status().ToString());
              return;
            }
            for (auto _ : state) {
              auto seconds = (*part)->ScanSeconds(c, a.scan_reps);
              if (!seconds.ok()) {
                fail(state, seconds.status().ToString());
                return;
              }
              state.SetIterationTime(*seconds);
              results->rows[name][c].scan = *seconds;
            }
          })
          ->Iterations(1)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark(
        (name + "/server/c:" + std::to_string(c)).c_str(),
        [=](benchmark::State& state) {
          auto part = lazy->Get();
          if (!part.ok()) {
            fail(state, part.status().ToString());
            return;
          }
          for (auto _ : state) {
            const LoadResult r = RunLoad(**part, c, a);
            if (r.errors > 0) {
              fail(state, std::to_string(r.errors) + " of " +
                              std::to_string(r.requests) +
                              " requests failed, first: " + r.first_error);
              return;
            }
            state.SetIterationTime(r.p99);
            state.counters["qps"] = r.qps;
            state.counters["p50_ms"] = r.p50 * 1e3;
            state.counters["p99_ms"] = r.p99 * 1e3;
            state.counters["requests"] = static_cast<double>(r.requests);
            Row& row = results->rows[name][c];
            row.load = r;
            row.loaded = true;
          }
        })
        ->Iterations(1)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace
}  // namespace retrace::bench

int main(int argc, char** argv) {
  retrace::KeepFreedMemoryForReuse();
  namespace rb = retrace::bench;
  benchmark::Initialize(&argc, argv);  // takes the --benchmark_* flags
  const rb::Args a = rb::Parse(argc, argv);

  rb::LazyPart vectors([&]() -> absl::StatusOr<std::unique_ptr<rb::Part>> {
    auto temp = std::make_unique<rb::TempDir>("vectors");
    const std::string store_dir = temp->path() + "/store";
    const double t0 = rb::Now();
    RETURN_IF_ERROR(rb::WriteSyntheticStore(a, store_dir));
    std::printf("vectors: synthetic store written in %.1f s\n", rb::Now() - t0);
    return rb::Part::Create(store_dir, "", a, std::move(temp));
  });
  rb::LazyPart image([&]() -> absl::StatusOr<std::unique_ptr<rb::Part>> {
    // Featurizer workers run side by side; one intra-op thread each keeps
    // them from oversubscribing the cores.
    at::set_num_threads(1);
    if (!a.run_dir.empty()) {
      return rb::Part::Create(a.store_dir, a.run_dir, a, nullptr);
    }
    auto temp = std::make_unique<rb::TempDir>("image");
    const std::string run_dir = temp->path() + "/run";
    const std::string store_dir = temp->path() + "/store";
    const double t0 = rb::Now();
    RETURN_IF_ERROR(rb::MakeTinyRun(temp->path(), run_dir, store_dir));
    std::printf("image: tiny run trained and its store built in %.1f s\n",
                rb::Now() - t0);
    return rb::Part::Create(store_dir, run_dir, a, std::move(temp));
  });

  const double store_bytes =
      double(a.n) * a.checkpoints * (a.buckets + 1) * a.dim * 2;
  std::printf(
      "server_bench: vectors store N=%lld C=%d S=%d (%d buckets + replay) "
      "D=%d fp16 (%.2f GB); image store %s; max batch %d, max queue delay "
      "%lld us, %d scan threads; clients run >= %.1f s and >= %d requests "
      "each after %d warm-up\n",
      static_cast<long long>(a.n), a.checkpoints, a.buckets + 1, a.buckets,
      a.dim, store_bytes / 1e9,
      a.run_dir.empty() ? "tiny run trained here" : a.store_dir.c_str(),
      rb::kMaxBatch, static_cast<long long>(a.max_queue_delay_us),
      retrace::kernels::CpuThreads(), a.seconds, a.rounds, a.warmup);
  std::fflush(stdout);

  // The same store as the vectors part, behind a router and --shards shards.
  rb::LazyPart routed([&]() -> absl::StatusOr<std::unique_ptr<rb::Part>> {
    ASSIGN_OR_RETURN(rb::Part * single, vectors.Get());
    return rb::Part::CreateRouted(single->store_dir(), a.shards, a);
  });

  rb::Results results;
  rb::RegisterPart("vectors", &vectors, a, &results);
  if (a.shards > 0) {
    std::printf("routed: %d shards, %d scan threads each%s\n", a.shards,
                rb::Part::ShardThreads(a),
                rb::Part::ShardThreads(a) == 0 ? " (0: all cores)" : "");
    rb::RegisterPart("routed", &routed, a, &results, /*with_scan=*/false);
  }
  rb::RegisterPart("image", &image, a, &results);
  rb::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  const std::vector<std::string> parts = {"vectors", "routed", "image"};
  std::printf("\n%-8s %8s %10s %10s %10s %16s %10s\n", "part", "clients", "QPS",
              "p50_ms", "p99_ms", "scan_ms(batch=c)", "p99/scan");
  for (const std::string& part : parts) {
    for (const auto& [c, row] : results.rows[part]) {
      if (!row.loaded || row.scan <= 0) continue;
      std::printf("%-8s %8d %10.1f %10.2f %10.2f %16.2f %10.2f\n", part.c_str(),
                  c, row.load.qps, row.load.p50 * 1e3, row.load.p99 * 1e3,
                  row.scan * 1e3, row.load.p99 / row.scan);
    }
  }
  std::printf(
      "\nwhere the time goes (server stage means, ms; other = gRPC, decode, "
      "select, client)\n%-8s %8s | %9s %9s %9s %9s | %27s\n",
      "part", "clients", "featurize", "queue", "score", "other",
      "slowest 1%: queue score other");
  for (const std::string& part : parts) {
    for (const auto& [c, row] : results.rows[part]) {
      if (!row.loaded) continue;
      const rb::Stages& m = row.load.all;
      const rb::Stages& w = row.load.slowest;
      std::printf(
          "%-8s %8d | %9.2f %9.2f %9.2f %9.2f | %9.2f %8.2f %8.2f\n",
          part.c_str(), c, m.featurize * 1e3, m.queue * 1e3, m.score * 1e3,
          (m.latency - m.featurize - m.queue - m.score) * 1e3, w.queue * 1e3,
          w.score * 1e3, (w.latency - w.featurize - w.queue - w.score) * 1e3);
    }
  }
  for (const auto& [c, row] : results.rows["vectors"]) {
    if (!row.loaded || row.scan <= 0) continue;
    std::printf(
        "server p99 / scan of the same batch, vectors, concurrency "
        "%d: %.2f\n",
        c, row.load.p99 / row.scan);
  }
  const std::string at = std::to_string(rb::kRatioConcurrency);
  std::printf(
      "server_p99_vs_scan is reported for vectors at concurrency %s "
      "(batch %s, the max batch)\n",
      at.c_str(), at.c_str());
  // Soak (target: no memory growth): the same load again and again, per
  // part; after the first window (allocator and gRPC pools warming up)
  // resident memory should stay flat.
  for (const auto& [name, lazy] :
       {std::pair<std::string, rb::LazyPart*>{"vectors", &vectors},
        std::pair<std::string, rb::LazyPart*>{"image", &image}}) {
    if (a.soak_windows == 0) break;
    auto part = lazy->Get();
    if (!part.ok()) {
      std::printf("soak %s: %s\n", name.c_str(),
                  part.status().ToString().c_str());
      results.failed = true;
      continue;
    }
    std::printf(
        "\nsoak %s: %d clients, %d windows of >= %.1f s; resident memory of "
        "the process after each\n",
        name.c_str(), rb::kSoakClients, a.soak_windows, a.seconds);
    double first = -1, last = -1;
    int64_t requests = 0;
    for (int w = 1; w <= a.soak_windows; ++w) {
      const rb::LoadResult r = rb::RunLoad(**part, rb::kSoakClients, a);
      last = rb::ResidentMegabytes();
      if (w == 1) first = last;
      requests += r.requests;
      std::printf(
          "soak %s window %d: %lld requests, %lld errors, p99 %.2f ms, "
          "rss %.1f MB\n",
          name.c_str(), w, static_cast<long long>(r.requests),
          static_cast<long long>(r.errors), r.p99 * 1e3, last);
      if (r.errors > 0) results.failed = true;
    }
    std::printf(
        "soak %s: %lld requests; resident memory %.1f MB after window 1, "
        "%.1f MB after window %d (%+.1f MB)\n",
        name.c_str(), static_cast<long long>(requests), first, last,
        a.soak_windows, last - first);
  }
  reporter.PrintRatio("server_p99_vs_scan", "vectors/server/c:" + at,
                      "vectors/scan/batch:" + at);
  if (a.shards > 0) {
    for (const auto& [c, row] : results.rows["routed"]) {
      const rb::Row& single = results.rows["vectors"][c];
      if (!row.loaded || !single.loaded) continue;
      std::printf(
          "router (%d shards) p99 / single server p99, vectors, concurrency "
          "%d: %.2f ms / %.2f ms = %.2f\n",
          a.shards, c, row.load.p99 * 1e3, single.load.p99 * 1e3,
          row.load.p99 / single.load.p99);
    }
    reporter.PrintRatio("router_p99_vs_single", "routed/server/c:" + at,
                        "vectors/server/c:" + at);
  }
  benchmark::Shutdown();
  return results.failed ? 1 : 0;
}

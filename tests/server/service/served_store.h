// Test helpers for the service: a tiny training run and two stores built from
// it (with and without the replay slot), made once per test binary build and
// shared by the test processes (CTest runs each test in its own process), and
// retraced's stack serving them in-process on loopback.
#ifndef RETRACE_TESTS_SERVER_SERVICE_SERVED_STORE_H_
#define RETRACE_TESTS_SERVER_SERVICE_SERVED_STORE_H_

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "jobs/build_store.h"
#include "retrace/v1/attribution.grpc.pb.h"
#include "server/data/image_folder.h"
#include "server/stack/server_stack.h"
#include "server/store/store_reader.h"
#include "tests/jobs/tiny_run.h"

namespace retrace::service::testing {

namespace fs = std::filesystem;

struct ServedStore {
  std::string data_root;
  std::string run_dir;
  std::string store_dir;            // with the replay slot
  std::string store_no_replay_dir;  // without
};

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Builds (or finds) the tiny run and its stores under a directory keyed by
// this binary's modification time, so a rebuilt test binary makes fresh ones.
inline const ServedStore& SharedStore() {
  static const ServedStore* store = [] {
    struct stat self {};
    EXPECT_EQ(stat("/proc/self/exe", &self), 0);
    const std::string root = ::testing::TempDir() + "/retrace-served-" +
                             std::to_string(self.st_mtime) + "-" +
                             std::to_string(self.st_size);
    auto* s = new ServedStore;
    s->data_root = root + "/data";
    s->run_dir = root + "/run";
    s->store_dir = root + "/store";
    s->store_no_replay_dir = root + "/store-no-replay";
    if (fs::exists(root + "/complete")) return s;

    // Build in a private directory, then rename it into place; a process
    // that loses the race uses the winner's.
    const std::string tmp = root + ".tmp-" + std::to_string(getpid());
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    jobs::testing::WriteImageFolder(tmp + "/data");
    auto spec = data::ParseMixtureSpec("folder:path=" + s->data_root);
    EXPECT_TRUE(spec.ok()) << spec.status();
    spec->seed = 3;
    // The mixture is read from the private copy but named by its final path
    // (the manifest records the name, and the server rereads it from there).
    data::MixtureSpec build_spec = *spec;
    build_spec.components[0].path = tmp + "/data";
    auto mixture = data::BuildMixture(build_spec);
    EXPECT_TRUE(mixture.ok()) << mixture.status();
    jobs::TrainOptions train;
    train.run_dir = tmp + "/run";
    train.threads = 1;
    auto trained = jobs::Train(jobs::testing::TinyTrainConfig(*spec),
                               mixture->images, mixture->sample_ids, train);
    EXPECT_TRUE(trained.ok()) << trained.status();
    for (bool replay : {true, false}) {
      jobs::StoreBuildConfig config;
      config.dim = 64;
      config.sparsity = 2;
      config.projection_seed = 11;
      config.store_seed = 5;
      config.num_buckets = 4;
      config.dtype = kernels::DType::kF32;
      config.samples_per_shard = 16;
      config.replay = replay ? jobs::ReplayMode::kOn : jobs::ReplayMode::kOff;
      jobs::StoreBuildOptions options;
      options.model_path = tmp + "/run";
      options.out_dir = tmp + (replay ? "/store" : "/store-no-replay");
      options.dataset_name = data::FormatMixtureSpec(*spec);
      options.dataset_seed = spec->seed;
      options.threads = 1;
      options.batch_rows = 16;
      auto built = jobs::BuildStore(config, mixture->images,
                                    mixture->sample_ids, options);
      EXPECT_TRUE(built.ok()) << built.status();
    }
    std::ofstream(tmp + "/complete") << "ok\n";
    std::error_code ec;
    fs::rename(tmp, root, ec);
    if (ec) fs::remove_all(tmp);
    EXPECT_TRUE(fs::exists(root + "/complete")) << root;
    return s;
  }();
  return *store;
}

// retraced's configuration for a test: a free loopback port, no metrics
// endpoint, the scan and the featurizer on the CPU, two featurizer workers.
// Stack fills in the store and the model.
inline stack::ServerConfig TestConfig() {
  stack::ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_port = -1;
  config.device = "cpu";
  config.featurize_device = "cpu";
  config.workers = 2;
  config.drain_timeout_s = 5;
  return config;
}

struct StackOptions {
  bool replay = true;      // the store with the replay slot, or the other
  bool with_model = true;  // --model: the tiny run
  // Everything else, as retraced's flags would set it.
  stack::ServerConfig config = TestConfig();
  // Accepted bearer tokens, written to a token file (config.token_file).
  std::vector<std::string> tokens;
  stack::StackOverrides overrides;
};

// retraced's stack (server/stack/server_stack.h) in this process, serving one
// of the shared stores, started.
class Stack {
 public:
  explicit Stack(StackOptions options = {}) {
    const ServedStore& s = SharedStore();
    stack::ServerConfig config = options.config;
    config.store_dir = options.replay ? s.store_dir : s.store_no_replay_dir;
    config.model_path = options.with_model ? s.run_dir : "";
    if (!options.tokens.empty()) {
      static std::atomic<int> files{0};
      config.token_file = ::testing::TempDir() + "/retrace-tokens-" +
                          std::to_string(getpid()) + "-" +
                          std::to_string(files++);
      std::ofstream out(config.token_file);
      for (const std::string& token : options.tokens) out << token << "\n";
    }
    auto created =
        stack::ServerStack::Create(config, std::move(options.overrides));
    EXPECT_TRUE(created.ok()) << created.status();
    stack_ = std::move(created).value();
    stack_->Start();
  }
  ~Stack() { stack_->Shutdown(absl::Seconds(5)); }

  std::string address() const {
    return "127.0.0.1:" + std::to_string(stack_->port());
  }
  std::unique_ptr<v1::Attribution::Stub> Stub(
      std::shared_ptr<grpc::ChannelCredentials> creds =
          grpc::InsecureChannelCredentials()) const {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    return v1::Attribution::NewStub(
        grpc::CreateCustomChannel(address(), creds, args));
  }
  const store::StoreReader& store() const { return stack_->store(); }
  QueryFeaturizer* featurizer() { return stack_->featurizer(); }
  stack::ServerStack& stack() { return *stack_; }

 private:
  std::unique_ptr<stack::ServerStack> stack_;
};

// PNG bytes of a smooth 28×28 gray test pattern (not in the training set).
inline std::string QueryPng(int variant) {
  std::vector<float> pixels(28 * 28);
  for (int y = 0; y < 28; ++y) {
    for (int x = 0; x < 28; ++x) {
      pixels[y * 28 + x] =
          static_cast<float>(std::sin(0.25 * x + 0.9 * variant) *
                             std::cos(0.15 * y + 0.3 * variant));
    }
  }
  auto png = data::EncodePng(pixels.data(), 1, 28, 28);
  EXPECT_TRUE(png.ok()) << png.status();
  return *png;
}

// Reference MATCHED scores (docs/scoring.md) over every checkpoint and bucket,
// in double, from the stored vectors:
// TracIn Σ w_c ‖g‖ ⟨u, q_raw⟩, ReTrac Σ w_c ⟨u, q_unit⟩.
inline std::vector<double> BruteForceMatched(const store::StoreReader& r,
                                             const scoring::BucketQuery& q,
                                             bool tracin) {
  const int64_t C = r.num_checkpoints(), B = r.num_buckets(), S = r.num_slots(),
                D = r.dim();
  EXPECT_EQ(r.dtype(), kernels::DType::kF32);
  const auto& checkpoints = r.manifest().spec.model.checkpoints;
  const std::vector<float>& qv = tracin ? q.raw : q.unit;
  std::vector<double> scores(static_cast<size_t>(r.num_samples()));
  for (int64_t n = 0; n < r.num_samples(); ++n) {
    auto block = r.Sample(n);
    const float* u = static_cast<const float*>(block->vectors);
    double total = 0;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < B; ++b) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += double{u[(c * S + b) * D + d]} * qv[(c * B + b) * D + d];
        }
        const double f = tracin ? block->norms[c * S + b] : 1.0;
        total += static_cast<float>(checkpoints[c].weight) * f * dot;
      }
    }
    scores[static_cast<size_t>(n)] = total;
  }
  return scores;
}

// Checks a ranked list against brute-force scores: every score within
// tolerance of the sample's reference, and the list is the reference's top
// (or bottom) k up to ties within tolerance.
inline void ExpectRanking(
    const google::protobuf::RepeatedPtrField<v1::AttributedSample>& got,
    const std::vector<double>& scores, int k, bool highest) {
  ASSERT_EQ(got.size(), k);
  std::vector<double> sorted = scores;
  std::sort(sorted.begin(), sorted.end());
  if (highest) std::reverse(sorted.begin(), sorted.end());
  double scale = 0;
  for (double s : scores) scale = std::max(scale, std::abs(s));
  const double tol = 1e-4 * scale + 1e-12;
  for (int i = 0; i < k; ++i) {
    SCOPED_TRACE(::testing::Message() << "rank " << i + 1);
    const v1::AttributedSample& s = got[i];
    EXPECT_EQ(s.rank(), i + 1);
    EXPECT_NEAR(s.score(), scores[static_cast<size_t>(s.index())], tol);
    EXPECT_NEAR(s.score(), sorted[static_cast<size_t>(i)], tol);
  }
}

}  // namespace retrace::service::testing

#endif  // RETRACE_TESTS_SERVER_SERVICE_SERVED_STORE_H_

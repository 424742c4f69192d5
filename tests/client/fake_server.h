// An in-process stand-in for retraced: retrace.v1.Attribution with canned
// but realistic answers, grpc.health.v1.Health, bearer-token authentication
// and optional TLS / mutual TLS, on a free loopback port. Client tests run
// against it without a model or a store.
//
// The canned store: kFakeSamples Fashion-MNIST-like samples (label n % 10,
// sample_id 1000 + n, a 28x28 grey PNG thumbnail each), kFakeCheckpoints
// checkpoints and kFakeBuckets buckets, no replay slot. It behaves the way
// the paper describes the two methods:
//   TracIn  returns the same samples for every query (FakeTracInIndex), with
//           scores 1024 - 16 * (rank - 1);
//   ReTrac  returns the samples of the query's class first (FakeQueryClass of
//           the image bytes), with scores 0.96875 - 0.015625 * (rank - 1).
// Opponents mirror the proponents with negated scores. Breakdown terms split
// each score over (checkpoint, bucket) by binary fractions, so they sum to
// the score exactly.
//
// Errors, like retraced's (docs/api.md):
//   INVALID_ARGUMENT   bytes that are neither PNG nor JPEG; top_k outside
//                      1..min(4096, N); REPLAY; checkpoint/bucket out of range;
//                      an unknown self-influence page token
//   UNAUTHENTICATED    no or a wrong "authorization: Bearer <token>"
//   RESOURCE_EXHAUSTED seed == kFakeSeedQueueFull
//   UNAVAILABLE        seed == kFakeSeedLoading
//   (sleeps until the call is cancelled or its deadline passes)
//                      seed == kFakeSeedSlow
#ifndef RETRACE_TESTS_CLIENT_FAKE_SERVER_H_
#define RETRACE_TESTS_CLIENT_FAKE_SERVER_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <stb/stb_image_write.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "retrace/v1/attribution.grpc.pb.h"

namespace retrace::client::testing {

inline constexpr char kFakeToken[] = "test-token";
inline constexpr int64_t kFakeSamples = 60;
inline constexpr int kFakeCheckpoints = 2;
inline constexpr int kFakeBuckets = 4;
inline constexpr int kFakeThumbnailSize = 28;
inline constexpr char kFakeStoreId[] =
    "5e1f0c2d3b4a59687766554433221100ffeeddccbbaa99887766554433221100";
inline constexpr uint64_t kFakeSeedQueueFull = 429;
inline constexpr uint64_t kFakeSeedLoading = 503;
inline constexpr uint64_t kFakeSeedSlow = 504;
inline constexpr std::array<const char*, 10> kFashionMnistNames = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

inline int32_t FakeLabel(int64_t index) {
  return static_cast<int32_t>(index % 10);
}

// PNG bytes of a w x h image with `channels` interleaved 8-bit channels.
inline std::string EncodePng(int width, int height, int channels,
                             const std::vector<uint8_t>& pixels) {
  std::string png;
  stbi_write_png_to_func(
      [](void* context, void* data, int size) {
        static_cast<std::string*>(context)->append(
            static_cast<const char*>(data), size);
      },
      &png, width, height, channels, pixels.data(), width * channels);
  return png;
}

// Grey level of thumbnail `index` at (x, y): diagonal stripes whose period
// depends on the label and whose brightness on the index.
inline uint8_t FakeThumbnailPixel(int64_t index, int x, int y) {
  const int period = 2 + FakeLabel(index);
  const bool stripe = ((x + y) / period) % 2 == 0;
  return static_cast<uint8_t>(stripe ? 60 + (index * 3) % 190 : 10);
}

inline std::string FakeThumbnailPng(int64_t index) {
  std::vector<uint8_t> pixels(kFakeThumbnailSize * kFakeThumbnailSize);
  for (int y = 0; y < kFakeThumbnailSize; ++y) {
    for (int x = 0; x < kFakeThumbnailSize; ++x) {
      pixels[y * kFakeThumbnailSize + x] = FakeThumbnailPixel(index, x, y);
    }
  }
  return EncodePng(kFakeThumbnailSize, kFakeThumbnailSize, 1, pixels);
}

// The class ReTrac "recognizes" in a query: the byte sum of the image mod 10.
inline int32_t FakeQueryClass(absl::string_view image) {
  uint64_t sum = 0;
  for (const char c : image) sum += static_cast<unsigned char>(c);
  return static_cast<int32_t>(sum % 10);
}

// Store index of TracIn's proponent of rank r (1-based): the same for every
// query. 13 is coprime with 60, so ranks 1..60 list every sample once.
inline int64_t FakeTracInIndex(int rank) {
  return (7 + 13 * static_cast<int64_t>(rank - 1)) % kFakeSamples;
}
// ReTrac's proponent of rank r: the query class's six samples first, then
// the next class's, and so on.
inline int64_t FakeRetracIndex(int32_t query_class, int rank) {
  const int r = rank - 1;
  return (r % 6) * 10 + (query_class + r / 6) % 10;
}
inline float FakeTracInScore(int rank) { return 1024.0f - 16.0f * (rank - 1); }
inline float FakeRetracScore(int rank) {
  return 0.96875f - 0.015625f * (rank - 1);
}
// Self-influence of rank r (descending), listed by index (7 * r) % 60.
inline int64_t FakeSelfInfluenceIndex(int64_t rank) {
  return (7 * (rank - 1)) % kFakeSamples;
}
inline float FakeSelfInfluenceScore(int64_t rank) {
  return 100.0f - 1.5f * static_cast<float>(rank - 1);
}

inline v1::AttributedSample FakeSample(int64_t index, int rank, float score,
                                       const v1::AttributeRequest& request,
                                       bool tracin) {
  v1::AttributedSample sample;
  sample.set_rank(rank);
  sample.set_index(index);
  sample.set_sample_id(1000 + index);
  sample.set_label(FakeLabel(index));
  sample.set_label_name(kFashionMnistNames[FakeLabel(index)]);
  sample.set_score(score);
  if (request.include_breakdown()) {
    // TracIn's weight sits in the low-noise buckets, where the norms are
    // largest; ReTrac's is even over the buckets.
    constexpr std::array<float, kFakeCheckpoints> kCheckpointShare = {0.75f,
                                                                      0.25f};
    constexpr std::array<float, kFakeBuckets> kTracInShare = {0.5f, 0.25f,
                                                              0.125f, 0.125f};
    for (int c = 0; c < kFakeCheckpoints; ++c) {
      for (int b = 0; b < kFakeBuckets; ++b) {
        v1::Contribution* term = sample.add_breakdown();
        term->set_checkpoint(c);
        term->set_slot(b);
        term->set_value(score * kCheckpointShare[c] *
                        (tracin ? kTracInShare[b] : 0.25f));
      }
    }
  }
  if (request.include_thumbnails()) {
    sample.set_thumbnail_png(FakeThumbnailPng(index));
  }
  return sample;
}

// The canned answer to a valid request.
inline v1::AttributeResponse FakeAttribution(
    const v1::AttributeRequest& request) {
  v1::AttributeResponse response;
  response.set_store_id(kFakeStoreId);
  response.set_request_id(request.request_id());
  std::vector<v1::Method> methods;
  for (const int method : request.methods()) {
    methods.push_back(static_cast<v1::Method>(method));
  }
  if (methods.empty()) methods = {v1::TRACIN, v1::RETRAC};
  const int32_t query_class = FakeQueryClass(request.image());
  for (const v1::Method method : methods) {
    const bool tracin = method == v1::TRACIN;
    v1::MethodResult* result = response.add_results();
    result->set_method(method);
    for (int rank = 1; rank <= request.top_k(); ++rank) {
      const int mirror = static_cast<int>(kFakeSamples) + 1 - rank;
      const int64_t pro =
          tracin ? FakeTracInIndex(rank) : FakeRetracIndex(query_class, rank);
      const int64_t opp = tracin ? FakeTracInIndex(mirror)
                                 : FakeRetracIndex(query_class, mirror);
      const float score =
          tracin ? FakeTracInScore(rank) : FakeRetracScore(rank);
      *result->add_proponents() = FakeSample(pro, rank, score, request, tracin);
      if (request.opponents()) {
        *result->add_opponents() =
            FakeSample(opp, rank, -score, request, tracin);
      }
    }
  }
  const std::array<std::pair<const char*, double>, 6> kTimings = {
      {{"decode", 0.5},
       {"featurize", 120.25},
       {"project", 2.0},
       {"queue", 0.25},
       {"score", 3.5},
       {"select", 0.125}}};
  for (const auto& [stage, ms] : kTimings) {
    v1::StageTiming* timing = response.add_timings();
    timing->set_stage(stage);
    timing->set_milliseconds(ms);
  }
  return response;
}

inline v1::StoreInfo FakeStoreInfo() {
  v1::StoreInfo info;
  info.set_store_id(kFakeStoreId);
  info.set_num_samples(kFakeSamples);
  info.set_num_checkpoints(kFakeCheckpoints);
  info.set_num_buckets(kFakeBuckets);
  info.set_has_replay(false);
  info.set_dim(512);
  info.set_dtype("F16");
  info.set_projection("sjlt");
  info.set_loss("mse");
  info.set_noise_schedule("cosine");
  for (int e = 0; e <= kFakeBuckets; ++e) info.add_bucket_edges(250 * e);
  info.add_checkpoint_weights(1.0f);
  info.add_checkpoint_weights(0.5f);
  for (int c = 0; c < kFakeCheckpoints; ++c) {
    for (int b = 0; b < kFakeBuckets; ++b) {
      // Norms fall with the timestep, steeply: the paper's norm bias.
      v1::SlotDiagnostics* d = info.add_diagnostics();
      d->set_checkpoint(c);
      d->set_bucket(b);
      d->set_timestep_begin(250 * b);
      d->set_timestep_end(250 * (b + 1));
      const float median = 64.0f / static_cast<float>(1 << (2 * b)) / (c + 1);
      d->set_norm_median(median);
      d->set_norm_mean(median * 1.25f);
      d->set_norm_p95(median * 3.0f);
    }
  }
  info.add_spearman_timestep_norm(-0.875f);
  info.add_spearman_timestep_norm(-0.75f);
  info.set_store_bytes(int64_t{kFakeSamples} * kFakeCheckpoints * kFakeBuckets *
                       512 * 2);
  info.set_backend("cpu");
  info.set_dataset("fashion-mnist:train:n=60");
  info.add_image_shape(1);
  info.add_image_shape(28);
  info.add_image_shape(28);
  info.set_accepts_images(true);
  return info;
}

class FakeAttributionService final : public v1::Attribution::Service {
 public:
  // `token` empty: no authentication.
  explicit FakeAttributionService(std::string token)
      : token_(std::move(token)) {}

  grpc::Status Attribute(grpc::ServerContext* context,
                         const v1::AttributeRequest* request,
                         v1::AttributeResponse* response) override {
    if (grpc::Status auth = Authenticate(context); !auth.ok()) return auth;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      attribute_requests_.push_back(*request);
    }
    if (request->seed() == kFakeSeedQueueFull) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "the scoring queue is full (256 queries waiting); "
                          "retry later");
    }
    if (request->seed() == kFakeSeedLoading) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is loading its store; retry later");
    }
    if (request->seed() == kFakeSeedSlow) {
      const auto give_up =
          std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (!context->IsCancelled() &&
             std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "deadline exceeded while featurizing");
    }
    if (grpc::Status valid = Validate(*request); !valid.ok()) return valid;
    *response = FakeAttribution(*request);
    return grpc::Status::OK;
  }

  grpc::Status SelfInfluence(grpc::ServerContext* context,
                             const v1::SelfInfluenceRequest* request,
                             v1::SelfInfluenceResponse* response) override {
    if (grpc::Status auth = Authenticate(context); !auth.ok()) return auth;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      self_influence_requests_.push_back(*request);
    }
    const int32_t page_size =
        request->page_size() == 0 ? 100 : request->page_size();
    if (page_size < 1 || page_size > 10000) {
      return grpc::Status(
          grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("page_size must be in 1..10000, got ", page_size));
    }
    // Tokens are "page:<offset>"; opaque to clients.
    int64_t offset = 0;
    if (!request->page_token().empty()) {
      const absl::string_view token = request->page_token();
      if (token.substr(0, 5) != "page:" ||
          !absl::SimpleAtoi(token.substr(5), &offset) || offset < 0 ||
          offset >= kFakeSamples) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "page_token is not one of this listing's");
      }
    }
    const int64_t end = std::min<int64_t>(kFakeSamples, offset + page_size);
    for (int64_t i = offset; i < end; ++i) {
      const int64_t rank = i + 1;
      v1::AttributedSample* sample = response->add_samples();
      const int64_t index = FakeSelfInfluenceIndex(rank);
      sample->set_rank(static_cast<int32_t>(rank));
      sample->set_index(index);
      sample->set_sample_id(1000 + index);
      sample->set_label(FakeLabel(index));
      sample->set_label_name(kFashionMnistNames[FakeLabel(index)]);
      const float score = FakeSelfInfluenceScore(rank);
      // TracIn's self-influence is its ReTrac one scaled by a squared norm.
      sample->set_score(request->method() == v1::TRACIN ? score * 256.0f
                                                        : score);
    }
    if (end < kFakeSamples)
      response->set_next_page_token(absl::StrCat("page:", end));
    return grpc::Status::OK;
  }

  grpc::Status GetStoreInfo(grpc::ServerContext* context,
                            const v1::GetStoreInfoRequest*,
                            v1::StoreInfo* response) override {
    if (grpc::Status auth = Authenticate(context); !auth.ok()) return auth;
    store_info_calls_.fetch_add(1);
    *response = FakeStoreInfo();
    return grpc::Status::OK;
  }

  std::vector<v1::AttributeRequest> attribute_requests() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return attribute_requests_;
  }
  std::vector<v1::SelfInfluenceRequest> self_influence_requests() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return self_influence_requests_;
  }
  int store_info_calls() const { return store_info_calls_.load(); }
  int rejected_calls() const { return rejected_calls_.load(); }

 private:
  grpc::Status Authenticate(grpc::ServerContext* context) {
    if (token_.empty()) return grpc::Status::OK;
    const auto& metadata = context->client_metadata();
    const auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      rejected_calls_.fetch_add(1);
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "missing 'authorization: Bearer <token>' metadata");
    }
    const std::string value(it->second.data(), it->second.size());
    if (value != absl::StrCat("Bearer ", token_)) {
      rejected_calls_.fetch_add(1);
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "the bearer token is not valid");
    }
    return grpc::Status::OK;
  }

  static grpc::Status Invalid(std::string message) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::move(message));
  }

  static grpc::Status Validate(const v1::AttributeRequest& request) {
    if (request.input_case() != v1::AttributeRequest::kImage) {
      return Invalid("no input: set image, tensor or query_vectors");
    }
    const std::string& image = request.image();
    const bool png = image.size() >= 8 && image.compare(0, 4, "\x89PNG") == 0;
    const bool jpeg =
        image.size() >= 3 && image.compare(0, 3, "\xFF\xD8\xFF") == 0;
    if (!png && !jpeg) {
      return Invalid(absl::StrCat("image: cannot decode ", image.size(),
                                  " bytes (neither PNG nor JPEG)"));
    }
    const int64_t max_k = std::min<int64_t>(4096, kFakeSamples);
    if (request.top_k() < 1 || request.top_k() > max_k) {
      return Invalid(absl::StrCat("top_k must be in 1..", max_k,
                                  " (min(4096, N)), got ", request.top_k()));
    }
    for (const int method : request.methods()) {
      if (method != v1::TRACIN && method != v1::RETRAC) {
        return Invalid(absl::StrCat("methods: unknown method ", method));
      }
    }
    if (request.pairing() == v1::REPLAY) {
      return Invalid(
          "pairing REPLAY needs a store with a replay slot; this store has "
          "none");
    }
    for (const int32_t c : request.checkpoints()) {
      if (c < 0 || c >= kFakeCheckpoints) {
        return Invalid(absl::StrCat("checkpoints: ", c, " is out of range 0..",
                                    kFakeCheckpoints - 1));
      }
    }
    for (const int32_t b : request.buckets()) {
      if (b < 0 || b >= kFakeBuckets) {
        return Invalid(absl::StrCat("buckets: ", b, " is out of range 0..",
                                    kFakeBuckets - 1));
      }
    }
    return grpc::Status::OK;
  }

  const std::string token_;
  mutable std::mutex mutex_;
  std::vector<v1::AttributeRequest> attribute_requests_;
  std::vector<v1::SelfInfluenceRequest> self_influence_requests_;
  std::atomic<int> store_info_calls_{0};
  std::atomic<int> rejected_calls_{0};
};

struct FakeServerOptions {
  std::string token = kFakeToken;  // empty: no authentication
  // TLS when both are set (PEM text); mutual TLS when client_ca_pem is too.
  std::string cert_pem;
  std::string key_pem;
  std::string client_ca_pem;
};

// The fake service plus the standard health service on 127.0.0.1:<free
// port>. Health starts SERVING. Shut down on destruction.
class FakeServer {
 public:
  explicit FakeServer(const FakeServerOptions& options = FakeServerOptions())
      : service_(options.token) {
    grpc::EnableDefaultHealthCheckService(true);
    std::shared_ptr<grpc::ServerCredentials> credentials =
        grpc::InsecureServerCredentials();
    if (!options.cert_pem.empty()) {
      grpc::SslServerCredentialsOptions ssl(
          options.client_ca_pem.empty()
              ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      ssl.pem_key_cert_pairs.push_back({options.key_pem, options.cert_pem});
      ssl.pem_root_certs = options.client_ca_pem;
      credentials = grpc::SslServerCredentials(ssl);
    }
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
  }
  ~FakeServer() {
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::seconds(1));
    }
  }

  bool ok() const { return server_ != nullptr && port_ > 0; }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  FakeAttributionService& service() { return service_; }

  // Health of the whole server (service name "").
  void SetServing(bool serving) {
    server_->GetHealthCheckService()->SetServingStatus(serving);
  }

 private:
  FakeAttributionService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace retrace::client::testing

#endif  // RETRACE_TESTS_CLIENT_FAKE_SERVER_H_

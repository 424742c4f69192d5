// retraced's stack (ServerStack, built from a ServerConfig as retraced
// builds it) over loopback: good requests against brute-force scores, every
// bad-input class with its code and message (and a good request answered
// right after each), limits, deadlines (also on the stack's simulated
// clock), TLS and tokens, streams, self-influence paging, store info, the
// stack's lifecycle and start-up errors, health, reflection, and 32
// concurrent clients getting the answers of the same requests sent one by one.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>
#include <zlib.h>

#include <atomic>
#include <cstdlib>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/server/service/served_store.h"

namespace retrace::service {
namespace {

using testing::QueryPng;
using testing::SharedStore;
using testing::Stack;
using testing::StackOptions;

constexpr int kK = 5;

v1::AttributeRequest ImageRequest(int variant, uint64_t seed = 1) {
  v1::AttributeRequest r;
  r.set_image(QueryPng(variant));
  r.set_top_k(kK);
  r.set_opponents(true);
  r.set_seed(seed);
  r.set_query_timesteps(1);
  r.set_query_noise_draws(2);
  r.set_request_id(absl::StrCat("img-", variant));
  return r;
}

// Query vectors derived from a seed: deterministic, finite.
v1::AttributeRequest VectorRequest(const store::StoreReader& store, int seed) {
  v1::AttributeRequest r;
  v1::QueryVectors* v = r.mutable_query_vectors();
  v->set_num_checkpoints(static_cast<int32_t>(store.num_checkpoints()));
  v->set_num_slots(static_cast<int32_t>(store.num_buckets()));
  v->set_dim(static_cast<int32_t>(store.dim()));
  v->set_store_id(store.manifest().store_id);
  const int64_t size =
      store.num_checkpoints() * store.num_buckets() * store.dim();
  for (int64_t i = 0; i < size; ++i) {
    v->add_raw(static_cast<float>(std::sin(0.37 * i + seed)));
    v->add_unit(static_cast<float>(std::cos(0.11 * i * seed + 1)));
  }
  r.set_top_k(kK);
  r.set_opponents(true);
  r.set_request_id(absl::StrCat("vec-", seed));
  return r;
}

scoring::BucketQuery Vectors(const v1::AttributeRequest& r) {
  scoring::BucketQuery q;
  q.raw.assign(r.query_vectors().raw().begin(), r.query_vectors().raw().end());
  q.unit.assign(r.query_vectors().unit().begin(),
                r.query_vectors().unit().end());
  return q;
}

grpc::Status Call(v1::Attribution::Stub& stub, const v1::AttributeRequest& r,
                  v1::AttributeResponse* out, const std::string& token = "",
                  int deadline_ms = 60000) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(deadline_ms));
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  return stub.Attribute(&context, r, out);
}

// Both methods' proponents and opponents against brute force.
void ExpectRightAnswer(const store::StoreReader& store,
                       const scoring::BucketQuery& q,
                       const v1::AttributeResponse& response) {
  ASSERT_EQ(response.results_size(), 2);
  for (const v1::MethodResult& m : response.results()) {
    SCOPED_TRACE(v1::Method_Name(m.method()));
    const auto scores =
        testing::BruteForceMatched(store, q, m.method() == v1::TRACIN);
    testing::ExpectRanking(m.proponents(), scores, kK, /*highest=*/true);
    testing::ExpectRanking(m.opponents(), scores, kK, /*highest=*/false);
  }
}

class ServerTest : public ::testing::Test {
 protected:
  // A good request right after a bad one still gets the right answer.
  void ExpectStillGood(Stack& stack, v1::Attribution::Stub& stub,
                       const std::string& token = "") {
    const v1::AttributeRequest good = VectorRequest(stack.store(), 3);
    v1::AttributeResponse response;
    const grpc::Status status = Call(stub, good, &response, token);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ExpectRightAnswer(stack.store(), Vectors(good), response);
  }
};

TEST_F(ServerTest, PrecomputedVectorsMatchBruteForce) {
  Stack stack;
  auto stub = stack.Stub();
  for (int seed : {1, 2}) {
    SCOPED_TRACE(seed);
    v1::AttributeRequest r = VectorRequest(stack.store(), seed);
    r.set_include_breakdown(true);
    v1::AttributeResponse response;
    const grpc::Status status = Call(*stub, r, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.request_id(), r.request_id());
    EXPECT_EQ(response.store_id(), stack.store().manifest().store_id);
    ExpectRightAnswer(stack.store(), Vectors(r), response);
    // The breakdown sums to the score.
    for (const v1::MethodResult& m : response.results()) {
      for (const v1::AttributedSample& s : m.proponents()) {
        double sum = 0;
        for (const v1::Contribution& c : s.breakdown()) sum += c.value();
        EXPECT_NEAR(sum, s.score(), 1e-4 * std::abs(s.score()) + 1e-9);
        EXPECT_LE(s.breakdown_size(), stack.store().num_checkpoints() *
                                          stack.store().num_buckets());
      }
    }
    std::vector<std::string> stages;
    for (const v1::StageTiming& t : response.timings())
      stages.push_back(t.stage());
    EXPECT_EQ(stages, (std::vector<std::string>{"featurize", "project", "queue",
                                                "score", "select"}));
  }
}

TEST_F(ServerTest, ImageMatchesFeaturizerAndBruteForce) {
  Stack stack;
  auto stub = stack.Stub();
  v1::AttributeRequest r = ImageRequest(1);
  r.set_include_thumbnails(true);
  v1::AttributeResponse response;
  const grpc::Status status = Call(*stub, r, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  // The same image through the featurizer directly.
  QueryImage image;
  image.channels = 1;
  image.height = image.width = 28;
  auto pixels =
      data::DecodeImage(r.image(), data::ImageSpec{1, 28, 28}, "test");
  ASSERT_TRUE(pixels.ok());
  image.pixels = *pixels;
  QueryFeatureOptions options;
  options.query_timesteps = 1;
  options.noise_draws = 2;
  options.seed = 1;
  auto q = stack.featurizer()->Featurize(image, options);
  ASSERT_TRUE(q.ok()) << q.status();
  ExpectRightAnswer(stack.store(), q->vectors, response);
  // Thumbnails are the training images; labels carry class names.
  const auto& dataset = stack.store().manifest().spec.dataset;
  auto spec = data::ParseMixtureSpec(dataset["name"].get<std::string>());
  ASSERT_TRUE(spec.ok());
  spec->seed = dataset["seed"].get<uint64_t>();
  auto images = data::BuildMixture(*spec);
  ASSERT_TRUE(images.ok());
  for (const v1::AttributedSample& s : response.results(0).proponents()) {
    const auto want =
        data::EncodePng(images->images.Image(s.index()).data(), 1, 28, 28);
    EXPECT_EQ(s.thumbnail_png(), *want) << "index " << s.index();
    EXPECT_TRUE(s.label_name() == "a" || s.label_name() == "b")
        << s.label_name();
  }
  std::vector<std::string> stages;
  for (const v1::StageTiming& t : response.timings())
    stages.push_back(t.stage());
  EXPECT_EQ(stages, (std::vector<std::string>{"decode", "featurize", "project",
                                              "queue", "score", "select"}));
  // Same seed, same answer; the tensor input gives the same as the image.
  v1::AttributeRequest as_tensor = r;
  as_tensor.mutable_tensor()->add_shape(28);
  as_tensor.mutable_tensor()->add_shape(28);
  for (float v : image.pixels) as_tensor.mutable_tensor()->add_values(v);
  v1::AttributeResponse again;
  ASSERT_TRUE(Call(*stub, as_tensor, &again).ok());
  ASSERT_EQ(again.results_size(), 2);
  for (int m = 0; m < 2; ++m) {
    for (int i = 0; i < kK; ++i) {
      EXPECT_EQ(again.results(m).proponents(i).index(),
                response.results(m).proponents(i).index());
      EXPECT_EQ(again.results(m).proponents(i).score(),
                response.results(m).proponents(i).score());
    }
  }
}

struct BadCase {
  std::string name;
  std::function<void(v1::AttributeRequest*)> mutate;
  grpc::StatusCode code;
  std::string message_part;
};

TEST_F(ServerTest, EveryBadInputClassIsRefusedAndTheServerKeepsServing) {
  StackOptions options;
  options.config.max_message_bytes = 256 << 10;
  Stack stack(options);
  auto stub = stack.Stub();
  const std::vector<BadCase> cases = {
      {"undecodable image",
       [](v1::AttributeRequest* r) { r->set_image("not a png at all"); },
       grpc::INVALID_ARGUMENT, "image"},
      {"empty input", [](v1::AttributeRequest* r) { r->clear_input(); },
       grpc::INVALID_ARGUMENT, "no input"},
      {"wrong image size",
       [](v1::AttributeRequest* r) {
         std::vector<float> px(3 * 32 * 32, 0.0f);
         r->set_image(*data::EncodePng(px.data(), 3, 32, 32));
       },
       grpc::INVALID_ARGUMENT,
       "image is 32x32 (height x width) with 3 channels (RGB); the model "
       "takes 1x28x28"},
      {"colour image for the gray model",
       [](v1::AttributeRequest* r) {
         std::vector<float> px(3 * 28 * 28, 0.0f);
         px[2 * 28 * 28] = 1.0f;  // blue at row 0, column 0
         r->set_image(*data::EncodePng(px.data(), 3, 28, 28));
       },
       grpc::INVALID_ARGUMENT, "image is a colour image"},
      {"wrong tensor shape",
       [](v1::AttributeRequest* r) {
         r->mutable_tensor()->add_shape(3);
         r->mutable_tensor()->add_shape(28);
         r->mutable_tensor()->add_shape(28);
       },
       grpc::INVALID_ARGUMENT, "shape [3, 28, 28]"},
      {"NaN in a tensor",
       [](v1::AttributeRequest* r) {
         v1::Tensor* t = r->mutable_tensor();
         t->add_shape(28);
         t->add_shape(28);
         for (int i = 0; i < 28 * 28; ++i) t->add_values(i == 17 ? NAN : 0.f);
       },
       grpc::INVALID_ARGUMENT, "position 17"},
      {"Inf in query vectors",
       [&](v1::AttributeRequest* r) {
         *r = VectorRequest(stack.store(), 1);
         r->mutable_query_vectors()->set_unit(5, INFINITY);
       },
       grpc::INVALID_ARGUMENT, "query_vectors.unit"},
      {"a tensor value outside [-1, 1]",
       [](v1::AttributeRequest* r) {
         v1::Tensor* t = r->mutable_tensor();
         t->add_shape(28);
         t->add_shape(28);
         for (int i = 0; i < 28 * 28; ++i) t->add_values(i == 3 ? 1.5f : 0.f);
       },
       grpc::INVALID_ARGUMENT, "tensor.values holds 1.5 at position 3"},
      {"a huge tensor value",
       [](v1::AttributeRequest* r) {
         v1::Tensor* t = r->mutable_tensor();
         t->add_shape(28);
         t->add_shape(28);
         for (int i = 0; i < 28 * 28; ++i) t->add_values(i == 0 ? -1e30f : 0.f);
       },
       grpc::INVALID_ARGUMENT, "every value must be in [-1, 1]"},
      {"a huge query vector value",
       [&](v1::AttributeRequest* r) {
         *r = VectorRequest(stack.store(), 1);
         r->mutable_query_vectors()->set_raw(2, 1e30f);
       },
       grpc::INVALID_ARGUMENT, "query_vectors.raw holds 1e+30 at position 2"},
      {"a 100 kB store_id is quoted by its prefix",
       [&](v1::AttributeRequest* r) {
         *r = VectorRequest(stack.store(), 1);
         r->mutable_query_vectors()->set_store_id(std::string(100000, 'z'));
       },
       grpc::INVALID_ARGUMENT, "zzz\u2026' (100000 bytes) is not the served"},
      {"a 100 kB request_id",
       [](v1::AttributeRequest* r) {
         r->set_request_id(std::string(100000, 'r'));
       },
       grpc::INVALID_ARGUMENT, "longer than 256 bytes"},
      {"a PNG that claims 30000x30000 pixels",
       [](v1::AttributeRequest* r) {
         // A valid 1x1 PNG whose IHDR is rewritten (with its CRC): refused
         // from the header, before anything is allocated.
         std::vector<float> px(1, 0.0f);
         std::string png = *data::EncodePng(px.data(), 1, 1, 1);
         for (int at : {16, 20}) {
           png[at] = 0;
           png[at + 1] = 0;
           png[at + 2] = 0x75;
           png[at + 3] = 0x30;
         }
         const uLong crc =
             crc32(0, reinterpret_cast<const Bytef*>(png.data() + 12), 17);
         for (int i = 0; i < 4; ++i) {
           png[29 + i] = static_cast<char>((crc >> (24 - 8 * i)) & 0xff);
         }
         r->set_image(png);
       },
       grpc::INVALID_ARGUMENT, "image is 30000x30000 (height x width)"},
      {"a PNG with a broken CRC",
       [](v1::AttributeRequest* r) {
         std::vector<float> px(28 * 28, 0.0f);
         std::string png = *data::EncodePng(px.data(), 1, 28, 28);
         png[png.size() - 13] ^= 0x40;  // the last byte of IDAT's CRC
         r->set_image(png);
       },
       grpc::INVALID_ARGUMENT, "CRC"},
      {"query vectors of the wrong size",
       [&](v1::AttributeRequest* r) {
         *r = VectorRequest(stack.store(), 1);
         r->mutable_query_vectors()->set_dim(32);
       },
       grpc::INVALID_ARGUMENT, "shape"},
      {"query vectors for another store",
       [&](v1::AttributeRequest* r) {
         *r = VectorRequest(stack.store(), 1);
         r->mutable_query_vectors()->set_store_id("0123");
       },
       grpc::INVALID_ARGUMENT, "store_id"},
      {"k zero after default? k negative",
       [](v1::AttributeRequest* r) { r->set_top_k(-1); },
       grpc::INVALID_ARGUMENT, "top_k"},
      {"k above the store", [](v1::AttributeRequest* r) { r->set_top_k(41); },
       grpc::INVALID_ARGUMENT, "top_k must be in 1..40"},
      {"unknown checkpoint",
       [](v1::AttributeRequest* r) { r->add_checkpoints(7); },
       grpc::INVALID_ARGUMENT, "unknown checkpoint 7"},
      {"unknown bucket", [](v1::AttributeRequest* r) { r->add_buckets(4); },
       grpc::INVALID_ARGUMENT, "unknown bucket 4"},
      {"unknown method",
       [](v1::AttributeRequest* r) {
         r->add_methods(static_cast<v1::Method>(9));
       },
       grpc::INVALID_ARGUMENT, "unknown method 9"},
      {"too many query timesteps",
       [](v1::AttributeRequest* r) { r->set_query_timesteps(1000); },
       grpc::INVALID_ARGUMENT, "query_timesteps"},
      {"oversized message",
       [](v1::AttributeRequest* r) {
         r->set_image(std::string(300 << 10, 'x'));
       },
       grpc::RESOURCE_EXHAUSTED, "larger than max"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttributeRequest r = ImageRequest(2);
    c.mutate(&r);
    v1::AttributeResponse response;
    const grpc::Status status = Call(*stub, r, &response);
    EXPECT_EQ(status.error_code(), c.code) << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), c.message_part))
        << status.error_message();
    ExpectStillGood(stack, *stub);
  }
}

TEST_F(ServerTest, ReplayOnAStoreWithoutReplaySlotIsRefused) {
  StackOptions options;
  options.replay = false;
  Stack stack(options);
  auto stub = stack.Stub();
  v1::AttributeRequest r = VectorRequest(stack.store(), 1);
  r.set_pairing(v1::REPLAY);
  v1::AttributeResponse response;
  const grpc::Status status = Call(*stub, r, &response);
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "replay slot"))
      << status.error_message();
  ExpectStillGood(stack, *stub);
  // On the store with the slot, REPLAY works.
  Stack with_replay;
  auto stub2 = with_replay.Stub();
  r = VectorRequest(with_replay.store(), 1);
  r.set_pairing(v1::REPLAY);
  EXPECT_TRUE(Call(*stub2, r, &response).ok());
}

TEST_F(ServerTest, ThumbnailsAndImagesNeedTheirData) {
  StackOptions options;
  options.with_model = false;
  options.config.thumbnails = false;
  Stack stack(options);
  auto stub = stack.Stub();
  v1::AttributeResponse response;
  grpc::Status status = Call(*stub, ImageRequest(1), &response);
  EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "query_vectors"));
  v1::AttributeRequest r = VectorRequest(stack.store(), 1);
  r.set_include_thumbnails(true);
  status = Call(*stub, r, &response);
  EXPECT_EQ(status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "thumbnails"));
  ExpectStillGood(stack, *stub);
}

TEST_F(ServerTest, BearerTokens) {
  StackOptions options;
  options.tokens = {"s3cret", "other"};
  Stack stack(options);
  auto stub = stack.Stub();
  v1::AttributeResponse response;
  const v1::AttributeRequest r = VectorRequest(stack.store(), 1);
  grpc::Status status = Call(*stub, r, &response);
  EXPECT_EQ(status.error_code(), grpc::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "missing"));
  status = Call(*stub, r, &response, "wrong");
  EXPECT_EQ(status.error_code(), grpc::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "not valid"));
  ExpectStillGood(stack, *stub, "s3cret");
  ExpectStillGood(stack, *stub, "other");
}

TEST_F(ServerTest, DeadlinesAreHonoured) {
  Stack stack;
  auto stub = stack.Stub();
  v1::AttributeResponse response;
  const grpc::Status status = Call(*stub, ImageRequest(1), &response, "", 1);
  EXPECT_EQ(status.error_code(), grpc::DEADLINE_EXCEEDED);
  ExpectStillGood(stack, *stub);
}

// Holds every featurization until released, so requests pile up.
class GatedFeaturizer : public QueryFeaturizer {
 public:
  explicit GatedFeaturizer(QueryFeaturizer* inner) : inner_(inner) {}
  std::vector<int64_t> image_shape() const override {
    return inner_->image_shape();
  }
  absl::StatusOr<FeaturizedQuery> Featurize(
      const QueryImage& image, const QueryFeatureOptions& options) override {
    entered_.fetch_add(1);
    while (!open_.load())
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return inner_->Featurize(image, options);
  }
  static std::atomic<int> entered_;
  static std::atomic<bool> open_;

 private:
  QueryFeaturizer* inner_;
};
std::atomic<int> GatedFeaturizer::entered_{0};
std::atomic<bool> GatedFeaturizer::open_{false};

TEST_F(ServerTest, ConcurrencyLimitGivesResourceExhausted) {
  StackOptions options;
  options.config.max_concurrent = 2;
  options.overrides.wrap_featurizer = [](QueryFeaturizer* inner) {
    return std::make_unique<GatedFeaturizer>(inner);
  };
  Stack stack(options);
  auto stub = stack.Stub();
  std::vector<std::thread> held;
  std::vector<grpc::Status> held_status(2);
  for (int i = 0; i < 2; ++i) {
    held.emplace_back([&, i] {
      v1::AttributeResponse response;
      held_status[i] = Call(*stub, ImageRequest(i), &response);
    });
  }
  while (GatedFeaturizer::entered_.load() < 2) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  v1::AttributeResponse response;
  const grpc::Status status =
      Call(*stub, VectorRequest(stack.store(), 1), &response);
  EXPECT_EQ(status.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "concurrent"));
  GatedFeaturizer::open_.store(true);
  for (auto& t : held) t.join();
  for (const auto& s : held_status) EXPECT_TRUE(s.ok()) << s.error_message();
  ExpectStillGood(stack, *stub);
}

TEST_F(ServerTest, ThirtyTwoConcurrentClientsGetTheSequentialAnswers) {
  StackOptions options;
  options.config.max_batch = 8;
  options.config.max_queue_delay_us = 5000;
  Stack stack(options);
  // A mix: image queries (two seeds), vector queries, and bad ones.
  std::vector<v1::AttributeRequest> requests;
  for (int i = 0; i < 32; ++i) {
    switch (i % 4) {
      case 0:
        requests.push_back(ImageRequest(i % 3, 1 + i % 2));
        break;
      case 1:
        requests.push_back(VectorRequest(stack.store(), i));
        break;
      case 2: {
        v1::AttributeRequest r = VectorRequest(stack.store(), i);
        r.set_include_breakdown(true);
        r.add_checkpoints(i % 3);
        r.set_top_k(1 + i % 7);
        requests.push_back(r);
        break;
      }
      default: {
        v1::AttributeRequest r = ImageRequest(1);
        if (i % 8 == 3)
          r.set_image("garbage");
        else
          r.set_top_k(5000);
        requests.push_back(r);
      }
    }
  }
  auto run = [&](const v1::AttributeRequest& r, std::string* out) {
    auto stub = stack.Stub();
    v1::AttributeResponse response;
    const grpc::Status status = Call(*stub, r, &response);
    response.clear_timings();  // the only part that may differ
    *out = absl::StrCat(status.error_code(), "|", status.error_message(), "|",
                        response.SerializeAsString());
  };
  std::vector<std::string> sequential(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) run(requests[i], &sequential[i]);
  std::vector<std::string> concurrent(requests.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < requests.size(); ++i) {
    clients.emplace_back([&, i] { run(requests[i], &concurrent[i]); });
  }
  for (auto& c : clients) c.join();
  int good = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(concurrent[i], sequential[i]);
    good += absl::StartsWith(sequential[i], "0|");
  }
  EXPECT_EQ(good, 24);
}

TEST_F(ServerTest, StreamAnswersInOrderWithErrorsInline) {
  Stack stack;
  auto stub = stack.Stub();
  grpc::ClientContext context;
  auto stream = stub->AttributeStream(&context);
  std::vector<v1::AttributeRequest> requests = {
      VectorRequest(stack.store(), 1), ImageRequest(1),
      VectorRequest(stack.store(), 2)};
  requests[1].set_image("bad bytes");
  for (const auto& r : requests) ASSERT_TRUE(stream->Write(r));
  stream->WritesDone();
  std::vector<v1::AttributeStreamResponse> responses;
  v1::AttributeStreamResponse response;
  while (stream->Read(&response)) responses.push_back(response);
  ASSERT_TRUE(stream->Finish().ok());
  ASSERT_EQ(responses.size(), 3u);
  EXPECT_EQ(responses[0].request_id(), "vec-1");
  EXPECT_EQ(responses[1].request_id(), "img-1");
  EXPECT_EQ(responses[2].request_id(), "vec-2");
  EXPECT_EQ(responses[1].error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(responses[1].error_message(), "image"));
  ExpectRightAnswer(stack.store(), Vectors(requests[0]),
                    responses[0].response());
  ExpectRightAnswer(stack.store(), Vectors(requests[2]),
                    responses[2].response());
}

TEST_F(ServerTest, ALongStreamIsThrottledNotRefused) {
  StackOptions options;
  options.config.max_concurrent = 2;
  Stack stack(options);
  auto stub = stack.Stub();
  grpc::ClientContext context;
  auto stream = stub->AttributeStream(&context);
  constexpr int kRequests = 24;
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(stream->Write(VectorRequest(stack.store(), 1 + i % 3)));
  }
  stream->WritesDone();
  int answered = 0;
  v1::AttributeStreamResponse response;
  while (stream->Read(&response)) {
    SCOPED_TRACE(answered);
    EXPECT_EQ(response.error_code(), 0) << response.error_message();
    EXPECT_EQ(response.request_id(), absl::StrCat("vec-", 1 + answered % 3));
    ++answered;
  }
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answered, kRequests);
}

TEST_F(ServerTest, SelfInfluencePagesThroughTheWholeRanking) {
  Stack stack;
  auto stub = stack.Stub();
  for (v1::Method method : {v1::TRACIN, v1::RETRAC}) {
    SCOPED_TRACE(v1::Method_Name(method));
    const int column = method == v1::TRACIN ? 0 : 1;
    std::vector<std::pair<float, int64_t>> want;
    for (int64_t n = 0; n < stack.store().num_samples(); ++n) {
      want.emplace_back(stack.store().Sample(n)->self_influence[column], n);
    }
    std::stable_sort(want.begin(), want.end(),
                     [](auto& a, auto& b) { return a.first > b.first; });
    std::vector<int64_t> got;
    std::string token;
    do {
      v1::SelfInfluenceRequest r;
      r.set_method(method);
      r.set_page_size(7);
      r.set_page_token(token);
      v1::SelfInfluenceResponse page;
      grpc::ClientContext context;
      ASSERT_TRUE(stub->SelfInfluence(&context, r, &page).ok());
      for (const auto& s : page.samples()) {
        EXPECT_EQ(s.rank(), static_cast<int>(got.size()) + 1);
        EXPECT_EQ(s.score(), want[got.size()].first);
        got.push_back(s.index());
      }
      token = page.next_page_token();
    } while (!token.empty());
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i].second);
  }
  v1::SelfInfluenceRequest bad;
  bad.set_page_token("nonsense");
  v1::SelfInfluenceResponse page;
  grpc::ClientContext context;
  const grpc::Status status = stub->SelfInfluence(&context, bad, &page);
  EXPECT_EQ(status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "page_token"));
  // A 100 kB token is refused with INVALID_ARGUMENT quoting its prefix (not
  // echoed whole, which would overflow the client's metadata limit).
  bad.set_page_token(std::string(100000, 't'));
  grpc::ClientContext context2;
  const grpc::Status long_token = stub->SelfInfluence(&context2, bad, &page);
  EXPECT_EQ(long_token.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_LT(long_token.error_message().size(), 200u);
  EXPECT_TRUE(absl::StrContains(long_token.error_message(), "(100000 bytes)"))
      << long_token.error_message();
}

TEST_F(ServerTest, StoreInfoDescribesTheManifest) {
  Stack stack;
  auto stub = stack.Stub();
  grpc::ClientContext context;
  v1::StoreInfo info;
  ASSERT_TRUE(stub->GetStoreInfo(&context, {}, &info).ok());
  const store::Manifest& m = stack.store().manifest();
  EXPECT_EQ(info.store_id(), m.store_id);
  EXPECT_EQ(info.num_samples(), 40);
  EXPECT_EQ(info.num_checkpoints(), 3);
  EXPECT_EQ(info.num_buckets(), 4);
  EXPECT_TRUE(info.has_replay());
  EXPECT_EQ(info.dim(), 64);
  EXPECT_EQ(info.dtype(), "F32");
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.bucket_edges_size(), 5);
  EXPECT_EQ(info.diagnostics_size(), 3 * 5);
  EXPECT_EQ(info.spearman_timestep_norm_size(), 3);
  EXPECT_TRUE(info.accepts_images());
  EXPECT_EQ(std::vector<int64_t>(info.image_shape().begin(),
                                 info.image_shape().end()),
            (std::vector<int64_t>{1, 28, 28}));
  EXPECT_FLOAT_EQ(info.diagnostics(1).norm_median(),
                  m.diagnostics["norm_stats"]["median"][0][1].get<float>());
}

// Featurizes with the model's featurizer, then moves the stack's simulated
// clock on by `step`: featurizing "took" that long.
class ClockAdvancingFeaturizer : public QueryFeaturizer {
 public:
  ClockAdvancingFeaturizer(QueryFeaturizer* inner, SimulatedClock* clock,
                           absl::Duration step)
      : inner_(inner), clock_(clock), step_(step) {}
  std::vector<int64_t> image_shape() const override {
    return inner_->image_shape();
  }
  absl::StatusOr<FeaturizedQuery> Featurize(
      const QueryImage& image, const QueryFeatureOptions& options) override {
    absl::StatusOr<FeaturizedQuery> q = inner_->Featurize(image, options);
    clock_->Advance(step_);
    return q;
  }

 private:
  QueryFeaturizer* inner_;
  SimulatedClock* clock_;
  absl::Duration step_;
};

TEST_F(ServerTest, DeadlinesAreCheckedOnTheStacksClock) {
  // Simulated time starts at the real time, so the clients' deadlines (real
  // time points, carried by gRPC) mean the same on it.
  SimulatedClock clock(absl::Now());
  StackOptions options;
  options.config.max_queue_delay_us = 0;  // batches close without time moving
  options.overrides.clock = &clock;
  options.overrides.wrap_featurizer = [&clock](QueryFeaturizer* inner) {
    return std::make_unique<ClockAdvancingFeaturizer>(inner, &clock,
                                                      absl::Minutes(10));
  };
  Stack stack(options);
  auto stub = stack.Stub();
  // 60 s to answer, but featurizing takes 10 minutes on the stack's clock.
  v1::AttributeResponse response;
  grpc::Status status = Call(*stub, ImageRequest(1), &response);
  EXPECT_EQ(status.error_code(), grpc::DEADLINE_EXCEEDED)
      << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "before scoring"))
      << status.error_message();
  // A deadline beyond the clock's time is met.
  const v1::AttributeRequest good = VectorRequest(stack.store(), 3);
  status = Call(*stub, good, &response, "", 60 * 60 * 1000);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectRightAnswer(stack.store(), Vectors(good), response);
}

TEST_F(ServerTest, TheStackServesBetweenStartAndShutdown) {
  stack::ServerConfig config = testing::TestConfig();
  config.store_dir = SharedStore().store_dir;
  config.metrics_port = 0;
  auto created = stack::ServerStack::Create(config);
  ASSERT_TRUE(created.ok()) << created.status();
  stack::ServerStack& server = **created;
  EXPECT_GT(server.metrics_port(), 0);
  auto stub = v1::Attribution::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", server.port()),
                          grpc::InsecureChannelCredentials()));
  const v1::AttributeRequest r = VectorRequest(server.store(), 1);
  v1::AttributeResponse response;
  // Created: listening and loaded, not serving yet.
  grpc::Status status = Call(*stub, r, &response);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "loading"))
      << status.error_message();
  server.Start();
  status = Call(*stub, r, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectRightAnswer(server.store(), Vectors(r), response);
  server.Shutdown(absl::Seconds(5));
  status = Call(*stub, r, &response, "", 2000);
  EXPECT_FALSE(status.ok());
}

TEST_F(ServerTest, TheStackNamesWhatStopsItsStartUp) {
  stack::ServerConfig config = testing::TestConfig();
  config.store_dir = SharedStore().store_dir + "-missing";
  auto missing = stack::ServerStack::Create(config);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound)
      << missing.status();
  config.store_dir = SharedStore().store_dir;
  config.max_batch = 65;
  auto batch = stack::ServerStack::Create(config);
  EXPECT_EQ(batch.status().code(), absl::StatusCode::kInvalidArgument)
      << batch.status();
  config.max_batch = 8;
  config.token_file = SharedStore().store_dir + "/no-such-token-file";
  auto tokens = stack::ServerStack::Create(config);
  EXPECT_FALSE(tokens.ok());
  EXPECT_TRUE(absl::StrContains(tokens.status().message(), "no-such-token"))
      << tokens.status();
}

TEST_F(ServerTest, HealthFollowsLoadingAndReflectionListsTheService) {
  // A server whose service has no engine yet: loading.
  AttributionService service(ServiceOptions{}, nullptr);
  GrpcServerOptions options;
  options.listen = "127.0.0.1:0";
  auto server = GrpcServer::Start(options, &service);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                          grpc::InsecureChannelCredentials());
  auto health = [&]() {
    // grpc.health.v1.HealthCheckRequest{service = ""} is empty on the wire.
    grpc::GenericStub generic(channel);
    grpc::ClientContext context;
    grpc::ByteBuffer request, reply;
    grpc::Slice empty("");
    request = grpc::ByteBuffer(&empty, 1);
    grpc::Status status;
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    generic.UnaryCall(&context, "/grpc.health.v1.Health/Check",
                      grpc::StubOptions(), &request, &reply,
                      [&](grpc::Status s) {
                        std::lock_guard<std::mutex> l(m);
                        status = s;
                        done = true;
                        cv.notify_all();
                      });
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
    EXPECT_TRUE(status.ok()) << status.error_message();
    std::vector<grpc::Slice> slices;
    reply.Dump(&slices);
    std::string bytes;
    for (auto& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    // HealthCheckResponse{status = 1 SERVING | 2 NOT_SERVING}: 0x08 <status>.
    return bytes.size() == 2 ? bytes[1] : -1;
  };
  EXPECT_EQ(health(), 2);  // NOT_SERVING while loading
  auto stub = v1::Attribution::NewStub(channel);
  v1::AttributeResponse response;
  grpc::Status status = Call(*stub, v1::AttributeRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "loading"));
  (*server)->SetServing(true);
  EXPECT_EQ(health(), 1);
  service.StartDraining();
  status = Call(*stub, v1::AttributeRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE);

  // Reflection: ServerReflectionRequest{list_services = ""} (field 7).
  grpc::GenericStub generic(channel);
  grpc::ClientContext context;
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(
      &context,
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  const char list_services[] = {0x3a, 0x00};
  grpc::Slice slice(list_services, sizeof(list_services));
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer reply;
  call->Read(&reply, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  reply.Dump(&slices);
  std::string bytes;
  for (auto& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_TRUE(absl::StrContains(bytes, "retrace.v1.Attribution"));
  EXPECT_TRUE(absl::StrContains(bytes, "grpc.health.v1.Health"));
  call->WritesDone(reinterpret_cast<void*>(4));
  cq.Next(&tag, &ok);
  context.TryCancel();
  grpc::Status finish;
  call->Finish(&finish, reinterpret_cast<void*>(5));
  while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(5)) {
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

// Certificates made with openssl at test time: a CA, a server certificate
// for 127.0.0.1/localhost and a client certificate, all signed by the CA.
class TlsTest : public ServerTest {
 protected:
  static void SetUpTestSuite() {
    dir_ = ::testing::TempDir() + "/retrace-tls-" + std::to_string(getpid());
    std::filesystem::create_directories(dir_);
    const std::string d = dir_;
    const std::string script = absl::StrCat(
        "set -e; cd ", d, "; exec >openssl.log 2>&1;",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca "
        "-keyout ca.key -out ca.pem;",
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext;",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "
        "server.key -out server.csr;",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
        "-CAcreateserial -days 2 -extfile san.ext -out server.pem;",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=client -keyout "
        "client.key -out client.csr;",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key "
        "-CAcreateserial -days 2 -out client.pem");
    ASSERT_EQ(std::system(script.c_str()), 0)
        << testing::ReadAll(d + "/openssl.log");
  }
  static std::string Path(const std::string& name) { return dir_ + "/" + name; }
  static std::shared_ptr<grpc::ChannelCredentials> Tls(bool client_cert) {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = testing::ReadAll(Path("ca.pem"));
    if (client_cert) {
      o.pem_private_key = testing::ReadAll(Path("client.key"));
      o.pem_cert_chain = testing::ReadAll(Path("client.pem"));
    }
    return grpc::SslCredentials(o);
  }
  static std::string dir_;
};
std::string TlsTest::dir_;

TEST_F(TlsTest, TlsRefusesPlainTextAndServesTls) {
  StackOptions options;
  options.with_model = false;
  options.config.tls_cert = Path("server.pem");
  options.config.tls_key = Path("server.key");
  Stack stack(options);
  auto plain = stack.Stub();
  v1::AttributeResponse response;
  const grpc::Status status =
      Call(*plain, VectorRequest(stack.store(), 1), &response, "", 5000);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE) << status.error_message();
  auto secure = stack.Stub(Tls(false));
  ExpectStillGood(stack, *secure);
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificate) {
  StackOptions options;
  options.with_model = false;
  options.config.tls_cert = Path("server.pem");
  options.config.tls_key = Path("server.key");
  options.config.tls_client_ca = Path("ca.pem");
  Stack stack(options);
  auto no_cert = stack.Stub(Tls(false));
  v1::AttributeResponse response;
  const grpc::Status status =
      Call(*no_cert, VectorRequest(stack.store(), 1), &response, "", 5000);
  EXPECT_EQ(status.error_code(), grpc::UNAVAILABLE) << status.error_message();
  auto with_cert = stack.Stub(Tls(true));
  ExpectStillGood(stack, *with_cert);
}

TEST_F(TlsTest, BadTlsFilesAreNamed) {
  AttributionService service(ServiceOptions{}, nullptr);
  GrpcServerOptions options;
  options.listen = "127.0.0.1:0";
  options.tls_cert_file = Path("missing.pem");
  options.tls_key_file = Path("server.key");
  auto server = GrpcServer::Start(options, &service);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(server.status().message(), "missing.pem"));
  options.tls_cert_file = Path("server.pem");
  options.tls_key_file = "";
  EXPECT_FALSE(GrpcServer::Start(options, &service).ok());
}

}  // namespace
}  // namespace retrace::service

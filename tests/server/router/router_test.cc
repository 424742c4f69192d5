// retraced --role router in front of three --role shard stacks, over
// loopback, against one retraced serving the whole store: 200 random
// requests get identical answers (indices, scores bit for bit, breakdowns,
// labels, thumbnails), self-influence pages match, and each fault (a shard
// down, slow, answering for another store, ranges with a gap or of two
// stores) gets its code naming the shard; a draining router finishes the
// fan-out in flight.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/router/shard_set.h"
#include "tests/server/service/served_store.h"

namespace retrace::router {
namespace {

using service::testing::QueryPng;
using service::testing::SharedStore;
using service::testing::Stack;
using service::testing::StackOptions;

StackOptions ShardOptions(int part, int parts, bool replay = true) {
  StackOptions options;
  options.replay = replay;
  options.with_model = false;
  options.config.role = "shard";
  options.config.shard_part = absl::StrCat(part, "/", parts);
  return options;
}

StackOptions RouterOptionsFor(const std::vector<std::string>& shards,
                              double timeout_s = 30) {
  StackOptions options;
  options.config.role = "router";
  options.config.shards = absl::StrJoin(shards, ",");
  options.config.shard_timeout_s = timeout_s;
  return options;
}

grpc::Status Call(v1::Attribution::Stub& stub, const v1::AttributeRequest& r,
                  v1::AttributeResponse* out, int deadline_ms = 60000) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(deadline_ms));
  return stub.Attribute(&context, r, out);
}

v1::StoreInfo Info(v1::Attribution::Stub& stub) {
  grpc::ClientContext context;
  v1::StoreInfo info;
  const grpc::Status status =
      stub.GetStoreInfo(&context, v1::GetStoreInfoRequest(), &info);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return info;
}

// A random request over the whole API: vectors or (sometimes) an image,
// any k, methods, pairing, filters, breakdowns and thumbnails.
v1::AttributeRequest RandomRequest(const v1::StoreInfo& info, std::mt19937& rng,
                                   int i) {
  v1::AttributeRequest r;
  auto coin = [&](double p) {
    return std::uniform_real_distribution<double>(0, 1)(rng) < p;
  };
  if (coin(0.1)) {
    r.set_image(QueryPng(i));
    r.set_query_timesteps(1);
    r.set_query_noise_draws(1);
    r.set_seed(i);
  } else {
    v1::QueryVectors* v = r.mutable_query_vectors();
    v->set_num_checkpoints(info.num_checkpoints());
    v->set_num_slots(info.num_buckets());
    v->set_dim(info.dim());
    const int64_t size =
        int64_t{info.num_checkpoints()} * info.num_buckets() * info.dim();
    std::normal_distribution<float> normal;
    for (int64_t j = 0; j < size; ++j) {
      // Coarse values make exact ties between samples likely too.
      v->add_raw(coin(0.2) ? 0.0f : std::round(normal(rng) * 4) / 4);
      v->add_unit(normal(rng));
    }
  }
  const int64_t n = info.num_samples();
  r.set_top_k(std::uniform_int_distribution<int>(
      1, static_cast<int>(std::min<int64_t>(n, 4096)))(rng));
  r.set_opponents(coin(0.5));
  if (coin(0.3)) r.add_methods(coin(0.5) ? v1::TRACIN : v1::RETRAC);
  if (coin(0.2)) r.add_methods(v1::TRACIN);
  r.set_pairing(coin(0.3) ? v1::REPLAY : v1::MATCHED);
  if (coin(0.3)) r.add_checkpoints(0);
  if (coin(0.3)) {
    r.add_buckets(
        std::uniform_int_distribution<int>(0, info.num_buckets() - 1)(rng));
  }
  r.set_include_breakdown(coin(0.5));
  r.set_include_thumbnails(coin(0.2));
  r.set_request_id(absl::StrCat("r", i));
  return r;
}

void ExpectSameResults(const v1::AttributeResponse& single,
                       const v1::AttributeResponse& routed) {
  EXPECT_EQ(routed.store_id(), single.store_id());
  EXPECT_EQ(routed.request_id(), single.request_id());
  ASSERT_EQ(routed.results_size(), single.results_size());
  for (int m = 0; m < single.results_size(); ++m) {
    const v1::MethodResult& a = single.results(m);
    const v1::MethodResult& b = routed.results(m);
    ASSERT_EQ(a.proponents_size(), b.proponents_size());
    ASSERT_EQ(a.opponents_size(), b.opponents_size());
    auto same = [](const v1::AttributedSample& x,
                   const v1::AttributedSample& y) {
      // Scores bit for bit, everything else field by field.
      const float xs = x.score(), ys = y.score();
      EXPECT_EQ(std::memcmp(&xs, &ys, sizeof(float)), 0)
          << "index " << x.index() << ": " << xs << " vs " << ys;
      EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(x, y))
          << x.ShortDebugString().substr(0, 300) << "\nvs\n"
          << y.ShortDebugString().substr(0, 300);
    };
    for (int i = 0; i < a.proponents_size(); ++i) {
      same(a.proponents(i), b.proponents(i));
    }
    for (int i = 0; i < a.opponents_size(); ++i) {
      same(a.opponents(i), b.opponents(i));
    }
  }
}

// One whole-store server, three shards and a router in front of them, shared
// by the tests of one process.
struct Cluster {
  Cluster() {
    single = std::make_unique<Stack>();
    std::vector<std::string> addresses;
    for (int part = 0; part < 3; ++part) {
      shards.push_back(std::make_unique<Stack>(ShardOptions(part, 3)));
      addresses.push_back(shards.back()->address());
    }
    router = std::make_unique<Stack>(RouterOptionsFor(addresses));
  }
  std::unique_ptr<Stack> single;
  std::vector<std::unique_ptr<Stack>> shards;
  std::unique_ptr<Stack> router;
};

Cluster& SharedCluster() {
  static Cluster* cluster = new Cluster;
  return *cluster;
}

TEST(RouterTest, TwoHundredRandomRequestsMatchOneServer) {
  Cluster& c = SharedCluster();
  auto single = c.single->Stub();
  auto router = c.router->Stub();
  const v1::StoreInfo info = Info(*single);
  ASSERT_GT(info.num_samples(), 3 * 8) << "the shards need samples each";
  std::mt19937 rng(20261205);
  int images = 0;
  for (int i = 0; i < 200; ++i) {
    const v1::AttributeRequest r = RandomRequest(info, rng, i);
    SCOPED_TRACE(absl::StrCat("request ", i, " k=", r.top_k()));
    images += r.has_image() ? 1 : 0;
    v1::AttributeResponse expected, got;
    const grpc::Status a = Call(*single, r, &expected);
    const grpc::Status b = Call(*router, r, &got);
    ASSERT_EQ(a.error_code(), b.error_code())
        << a.error_message() << " | " << b.error_message();
    if (!a.ok()) continue;
    ExpectSameResults(expected, got);
    EXPECT_EQ(got.missing_ranges_size(), 0);
  }
  EXPECT_GT(images, 5);
}

TEST(RouterTest, MorePartsThanShardFilesStillMatch) {
  // 5 parts of a store of 3 shard files: parts 0 and 2 serve no sample.
  Cluster& c = SharedCluster();
  std::vector<std::unique_ptr<Stack>> shards;
  std::vector<std::string> addresses;
  for (int part = 0; part < 5; ++part) {
    shards.push_back(std::make_unique<Stack>(ShardOptions(part, 5)));
    addresses.push_back(shards.back()->address());
  }
  EXPECT_EQ(Info(*shards[0]->Stub()).served_end_sample(), 0);
  StackOptions options = RouterOptionsFor(addresses);
  options.with_model = false;
  Stack router(std::move(options));
  auto single = c.single->Stub();
  const v1::StoreInfo info = Info(*single);
  std::mt19937 rng(5);
  for (int i = 0; i < 20; ++i) {
    v1::AttributeRequest r = RandomRequest(info, rng, i);
    if (r.has_image()) continue;
    SCOPED_TRACE(absl::StrCat("request ", i));
    v1::AttributeResponse expected, got;
    ASSERT_TRUE(Call(*single, r, &expected).ok());
    const grpc::Status status = Call(*router.Stub(), r, &got);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ExpectSameResults(expected, got);
  }
}

TEST(RouterTest, SelfInfluencePagesMatchOneServer) {
  Cluster& c = SharedCluster();
  auto single = c.single->Stub();
  auto router = c.router->Stub();
  for (v1::Method method : {v1::TRACIN, v1::RETRAC}) {
    std::string a_token, b_token;
    int64_t listed = 0;
    do {
      v1::SelfInfluenceRequest a_req, b_req;
      a_req.set_method(method);
      a_req.set_page_size(7);
      a_req.set_page_token(a_token);
      b_req = a_req;
      b_req.set_page_token(b_token);
      v1::SelfInfluenceResponse a, b;
      grpc::ClientContext ca, cb;
      ASSERT_TRUE(single->SelfInfluence(&ca, a_req, &a).ok());
      const grpc::Status status = router->SelfInfluence(&cb, b_req, &b);
      ASSERT_TRUE(status.ok()) << status.error_message();
      ASSERT_EQ(a.samples_size(), b.samples_size());
      for (int i = 0; i < a.samples_size(); ++i) {
        EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(
            a.samples(i), b.samples(i)))
            << a.samples(i).ShortDebugString() << " vs "
            << b.samples(i).ShortDebugString();
      }
      listed += b.samples_size();
      a_token = a.next_page_token();
      b_token = b.next_page_token();
      EXPECT_EQ(a_token.empty(), b_token.empty());
    } while (!a_token.empty() && !b_token.empty());
    EXPECT_EQ(listed, Info(*single).num_samples());
  }
  // A token of another listing or a made-up one is refused.
  v1::SelfInfluenceRequest bad;
  bad.set_page_token("rsi1:1:0,0");
  v1::SelfInfluenceResponse out;
  grpc::ClientContext context;
  const grpc::Status status = router->SelfInfluence(&context, bad, &out);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(
      absl::StrContains(status.error_message(), "another set of shards"))
      << status.error_message();
}

TEST(RouterTest, StoreInfoDescribesTheWholeStoreAndItsShards) {
  Cluster& c = SharedCluster();
  const v1::StoreInfo single = Info(*c.single->Stub());
  const v1::StoreInfo routed = Info(*c.router->Stub());
  EXPECT_EQ(routed.role(), "router");
  EXPECT_EQ(single.role(), "single");
  EXPECT_EQ(routed.store_id(), single.store_id());
  EXPECT_EQ(routed.num_samples(), single.num_samples());
  EXPECT_EQ(routed.store_bytes(), single.store_bytes());
  EXPECT_TRUE(routed.accepts_images());
  ASSERT_EQ(routed.shards_size(), 3);
  int64_t next = 0;
  for (int i = 0; i < 3; ++i) {
    const v1::StoreInfo shard = Info(*c.shards[static_cast<size_t>(i)]->Stub());
    EXPECT_EQ(shard.role(), "shard");
    EXPECT_EQ(shard.part_index(), i);
    EXPECT_EQ(shard.num_parts(), 3);
    EXPECT_FALSE(shard.accepts_images());
    EXPECT_EQ(shard.served_first_sample(), next);
    EXPECT_EQ(routed.shards(i).first_sample(), next);
    EXPECT_EQ(routed.shards(i).end_sample(), shard.served_end_sample());
    EXPECT_EQ(routed.shards(i).shard(),
              c.shards[static_cast<size_t>(i)]->address());
    next = shard.served_end_sample();
  }
  EXPECT_EQ(next, single.num_samples());
}

// A shard in front of a real one: forwards every call, after `delay`, and
// can claim another store.
class ProxyShard final : public v1::Attribution::Service {
 public:
  explicit ProxyShard(const std::string& target)
      : stub_(v1::Attribution::NewStub(
            grpc::CreateChannel(target, grpc::InsecureChannelCredentials()))) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
  }
  ~ProxyShard() override { server_->Shutdown(); }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  std::atomic<int> delay_ms{0};
  std::atomic<bool> other_store{false};

  grpc::Status Attribute(grpc::ServerContext*, const v1::AttributeRequest* r,
                         v1::AttributeResponse* out) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms.load()));
    grpc::ClientContext context;
    const grpc::Status status = stub_->Attribute(&context, *r, out);
    if (other_store) out->set_store_id(std::string(64, 'f'));
    return status;
  }
  grpc::Status SelfInfluence(grpc::ServerContext*,
                             const v1::SelfInfluenceRequest* r,
                             v1::SelfInfluenceResponse* out) override {
    grpc::ClientContext context;
    return stub_->SelfInfluence(&context, *r, out);
  }
  grpc::Status GetStoreInfo(grpc::ServerContext*,
                            const v1::GetStoreInfoRequest* r,
                            v1::StoreInfo* out) override {
    grpc::ClientContext context;
    return stub_->GetStoreInfo(&context, *r, out);
  }

 private:
  std::unique_ptr<v1::Attribution::Stub> stub_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

v1::AttributeRequest SimpleRequest(const v1::StoreInfo& info) {
  std::mt19937 rng(7);
  v1::AttributeRequest r = RandomRequest(info, rng, 1);
  r.clear_image();
  v1::QueryVectors* v = r.mutable_query_vectors();
  v->set_num_checkpoints(info.num_checkpoints());
  v->set_num_slots(info.num_buckets());
  v->set_dim(info.dim());
  v->clear_raw();
  v->clear_unit();
  const int64_t size =
      int64_t{info.num_checkpoints()} * info.num_buckets() * info.dim();
  for (int64_t j = 0; j < size; ++j) {
    v->add_raw(std::sin(0.3f * j));
    v->add_unit(std::cos(0.2f * j));
  }
  r.set_top_k(static_cast<int32_t>(info.num_samples()));
  r.set_pairing(v1::MATCHED);
  r.clear_checkpoints();
  r.clear_buckets();
  r.set_include_thumbnails(false);
  r.clear_methods();
  r.set_opponents(true);
  return r;
}

TEST(RouterTest, ShardDownIsUnavailableOrAPartialAnswerNamingIt) {
  Cluster& c = SharedCluster();
  std::vector<std::unique_ptr<Stack>> shards;
  std::vector<std::string> addresses;
  for (int part = 0; part < 3; ++part) {
    shards.push_back(std::make_unique<Stack>(ShardOptions(part, 3)));
    addresses.push_back(shards.back()->address());
  }
  StackOptions options = RouterOptionsFor(addresses);
  options.with_model = false;
  Stack router(std::move(options));
  const v1::StoreInfo info = Info(*c.single->Stub());
  const v1::StoreInfo down_info = Info(*shards[1]->Stub());
  shards[1].reset();  // shard 1 goes away

  v1::AttributeRequest r = SimpleRequest(info);
  v1::AttributeResponse response;
  grpc::Status status = Call(*router.Stub(), r, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(status.error_message(), addresses[1]))
      << status.error_message();

  // With partial results: the others' merged answer, the gap named.
  r.set_allow_partial(true);
  status = Call(*router.Stub(), r, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.missing_ranges_size(), 1);
  const v1::SampleRange& missing = response.missing_ranges(0);
  EXPECT_EQ(missing.shard(), addresses[1]);
  EXPECT_EQ(missing.first_sample(), down_info.served_first_sample());
  EXPECT_EQ(missing.end_sample(), down_info.served_end_sample());
  // The single server's full ranking without the missing samples.
  v1::AttributeResponse whole;
  ASSERT_TRUE(Call(*c.single->Stub(), r, &whole).ok());
  for (int m = 0; m < whole.results_size(); ++m) {
    std::vector<int64_t> expected;
    for (const v1::AttributedSample& s : whole.results(m).proponents()) {
      if (s.index() < missing.first_sample() ||
          s.index() >= missing.end_sample()) {
        expected.push_back(s.index());
      }
    }
    std::vector<int64_t> got;
    for (const v1::AttributedSample& s : response.results(m).proponents()) {
      got.push_back(s.index());
    }
    EXPECT_EQ(got, expected);
  }
  // Readiness follows the shards.
  const absl::Status watch =
      router.stack().router().Watch(absl::Now() + absl::Seconds(5));
  EXPECT_TRUE(absl::IsUnavailable(watch)) << watch;
  EXPECT_TRUE(absl::StrContains(watch.message(), addresses[1])) << watch;
}

TEST(RouterTest, SlowShardOrOneOfAnotherStoreIsUnavailableNamingIt) {
  Cluster& c = SharedCluster();
  ProxyShard proxy(c.shards[2]->address());
  StackOptions options = RouterOptionsFor(
      {c.shards[0]->address(), c.shards[1]->address(), proxy.address()},
      /*timeout_s=*/0.5);
  options.with_model = false;
  Stack router(std::move(options));
  const v1::AttributeRequest r = SimpleRequest(Info(*c.single->Stub()));
  v1::AttributeResponse response;
  ASSERT_TRUE(Call(*router.Stub(), r, &response).ok());

  proxy.delay_ms = 1500;
  grpc::Status status = Call(*router.Stub(), r, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(status.error_message(), proxy.address()))
      << status.error_message();
  // The client's own deadline, shorter than the shard timeout, is a
  // deadline error.
  status = Call(*router.Stub(), r, &response, /*deadline_ms=*/200);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << status.error_message();

  proxy.delay_ms = 0;
  proxy.other_store = true;
  status = Call(*router.Stub(), r, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "answered for store"))
      << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), proxy.address()));
}

TEST(RouterTest, DiscoveryRefusesGapsAndMixedStores) {
  Cluster& c = SharedCluster();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  // Parts 0 and 2 of 3: part 1's samples have no shard.
  absl::StatusOr<ShardTopology> gap = DiscoverShards(
      {c.shards[0]->address(), c.shards[2]->address()}, {}, deadline);
  ASSERT_FALSE(gap.ok());
  EXPECT_TRUE(absl::IsUnavailable(gap.status())) << gap.status();
  EXPECT_TRUE(absl::StrContains(gap.status().message(), "unserved"))
      << gap.status();
  // Two stores.
  Stack other(ShardOptions(1, 3, /*replay=*/false));
  absl::StatusOr<ShardTopology> mixed = DiscoverShards(
      {c.shards[0]->address(), other.address(), c.shards[2]->address()}, {},
      deadline);
  ASSERT_FALSE(mixed.ok());
  EXPECT_TRUE(absl::StrContains(mixed.status().message(), "serves store"))
      << mixed.status();
  // A shard listed twice overlaps.
  absl::StatusOr<ShardTopology> twice =
      DiscoverShards({c.shards[0]->address(), c.shards[0]->address(),
                      c.shards[1]->address(), c.shards[2]->address()},
                     {}, deadline);
  ASSERT_FALSE(twice.ok());
  EXPECT_TRUE(absl::StrContains(twice.status().message(), "overlaps"))
      << twice.status();
}

TEST(RouterTest, ShardAddressesFromAListOrDns) {
  auto list = ResolveShardAddresses("a:1, b:2");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, (std::vector<std::string>{"a:1", "b:2"}));
  auto dns = ResolveShardAddresses("dns:///localhost:50051");
  ASSERT_TRUE(dns.ok()) << dns.status();
  EXPECT_NE(std::find(dns->begin(), dns->end(), "127.0.0.1:50051"), dns->end())
      << absl::StrJoin(*dns, ",");
  EXPECT_TRUE(
      absl::IsInvalidArgument(ResolveShardAddresses("a:1,,b:2").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ResolveShardAddresses("").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      ResolveShardAddresses("dns:///nameonly").status()));
}

TEST(RouterTest, DrainingRouterFinishesTheFanOutInFlight) {
  Cluster& c = SharedCluster();
  ProxyShard proxy(c.shards[2]->address());
  proxy.delay_ms = 1000;
  StackOptions options = RouterOptionsFor(
      {c.shards[0]->address(), c.shards[1]->address(), proxy.address()});
  options.with_model = false;
  auto router = std::make_unique<Stack>(std::move(options));
  auto stub = router->Stub();
  const v1::AttributeRequest r = SimpleRequest(Info(*c.single->Stub()));
  grpc::Status status;
  v1::AttributeResponse response;
  std::thread client([&] { status = Call(*stub, r, &response); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  router->stack().Shutdown(absl::Seconds(10));  // as on SIGTERM
  client.join();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.results_size(), 2);
}

}  // namespace
}  // namespace retrace::router

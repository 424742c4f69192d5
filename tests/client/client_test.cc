// retrace_client's calls against the in-process fake server, and the pieces
// of output formatting that need no process: token files, status mapping,
// paging, health, slot names, the progress line.
#include "client/client.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "client/format.h"
#include "client/progress.h"
#include "tests/client/fake_server.h"

namespace retrace::client {
namespace {

using testing::FakeServer;
using testing::kFakeSamples;
using testing::kFakeToken;

std::unique_ptr<Client> Connect(const FakeServer& server,
                                const std::string& token = kFakeToken) {
  ConnectionOptions options;
  options.server = server.address();
  options.token = token;
  options.timeout = absl::Seconds(30);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? *std::move(client) : nullptr;
}

TEST(ClientTokenFileTest, FirstTokenLineTrimmed) {
  const std::string path = ::testing::TempDir() + "/retrace_client_tokens";
  std::ofstream(path) << "# comment\n\n   \t\n  abc def \nsecond\n";
  absl::StatusOr<std::string> token = ReadTokenFile(path);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "abc def");

  std::ofstream(path) << "# only comments\n\n";
  EXPECT_EQ(ReadTokenFile(path).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadTokenFile(path + ".missing").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ClientTest, CreateChecksTlsMaterialWithoutContactingTheServer) {
  ConnectionOptions options;
  options.server = "127.0.0.1:1";
  EXPECT_TRUE(Client::Create(options).ok());
  options.cert_file = "/nonexistent/cert.pem";
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);  // no key
  options.key_file = "/nonexistent/key.pem";
  const absl::Status missing = Client::Create(options).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing.message(), "/nonexistent/cert.pem"));

  const std::string not_pem = ::testing::TempDir() + "/retrace_not_pem";
  std::ofstream(not_pem) << "hello";
  options = ConnectionOptions();
  options.ca_file = not_pem;
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = ConnectionOptions();
  options.tls_server_name = "x";
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ClientTest, CallsReturnTheServersCodeAndMessage) {
  FakeServer server;
  ASSERT_TRUE(server.ok());
  std::unique_ptr<Client> client = Connect(server, "wrong");
  ASSERT_NE(client, nullptr);
  const absl::Status status = client->GetStoreInfo().status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(status.message(), "the bearer token is not valid");

  client = Connect(server);
  v1::AttributeRequest request;
  request.set_image("GIF89a");
  request.set_top_k(3);
  const absl::Status bad = client->Attribute(request).status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.message(), "neither PNG nor JPEG"));

  EXPECT_EQ(FromGrpcStatus(
                grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "full")),
            absl::ResourceExhaustedError("full"));
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

TEST(ClientTest, TopSelfInfluencePagesAndStops) {
  FakeServer server;
  ASSERT_TRUE(server.ok());
  std::unique_ptr<Client> client = Connect(server);
  ASSERT_NE(client, nullptr);
  for (const int64_t count :
       {int64_t{1}, int64_t{7}, int64_t{59}, kFakeSamples, int64_t{1000}}) {
    for (const int32_t page : {0, 1, 7, 60, 10000}) {
      SCOPED_TRACE(::testing::Message()
                   << "count " << count << " page " << page);
      absl::StatusOr<std::vector<v1::AttributedSample>> samples =
          client->TopSelfInfluence(v1::RETRAC, count, page);
      ASSERT_TRUE(samples.ok()) << samples.status();
      ASSERT_EQ(static_cast<int64_t>(samples->size()),
                std::min(count, kFakeSamples));
      for (size_t i = 0; i < samples->size(); ++i) {
        EXPECT_EQ((*samples)[i].rank(), static_cast<int32_t>(i + 1));
      }
    }
  }
}

TEST(ClientTest, HealthCheck) {
  FakeServer server;
  ASSERT_TRUE(server.ok());
  std::unique_ptr<Client> client = Connect(server, "");
  ASSERT_NE(client, nullptr);
  absl::StatusOr<ServingStatus> status = client->CheckHealth("");
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, ServingStatus::kServing);
  server.SetServing(false);
  status = client->CheckHealth("");
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, ServingStatus::kNotServing);
  EXPECT_EQ(client->CheckHealth("unknown.Service").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ServingStatusName(ServingStatus::kNotServing), "NOT_SERVING");
}

TEST(ClientFormatTest, SlotNames) {
  const v1::StoreInfo info = testing::FakeStoreInfo();
  EXPECT_EQ(SlotName(0, &info), "t0-249");
  EXPECT_EQ(SlotName(3, &info), "t750-999");
  EXPECT_EQ(SlotName(4, &info), "slot 4");  // no replay slot in this store
  EXPECT_EQ(SlotName(2, nullptr), "slot 2");
  v1::StoreInfo with_replay = info;
  with_replay.set_has_replay(true);
  EXPECT_EQ(SlotName(4, &with_replay), "replay");
}

TEST(ClientFormatTest, ProgressLine) {
  EXPECT_EQ(FormatQueryProgress(3, 10, "a.png", 10), "[###.......] 3/10 a.png");
  EXPECT_EQ(FormatQueryProgress(0, 4, "b.png", 4), "[....] 0/4 b.png");
  EXPECT_EQ(FormatQueryProgress(2, 2, "c.png", 0), "2/2 c.png");
}

TEST(ClientFormatTest, LabelNameColumnOnlyWhenAnySampleHasOne) {
  v1::AttributeResponse response;
  v1::MethodResult* result = response.add_results();
  result->set_method(v1::RETRAC);
  v1::AttributedSample* sample = result->add_proponents();
  sample->set_rank(1);
  sample->set_index(4);
  sample->set_sample_id(99);
  sample->set_label(3);
  sample->set_score(0.5f);
  std::string text = FormatAttributeText("q.png", response, {});
  EXPECT_FALSE(absl::StrContains(text, "name")) << text;
  EXPECT_TRUE(absl::StrContains(text, "     1      4         99      3    0.5"))
      << text;
  sample->set_label_name("Dress");
  text = FormatAttributeText("q.png", response, {});
  EXPECT_TRUE(absl::StrContains(text, "label  name   score")) << text;
}

}  // namespace
}  // namespace retrace::client

// The retrace binary run as a user runs it, against the in-process fake
// server: tables, JSON, exit codes, error messages, health, TLS and the
// contact sheet file.
#include <gtest/gtest.h>
#include <stb/stb_image.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tests/client/fake_server.h"
#include "tests/client/subprocess.h"

namespace retrace::client::testing {
namespace {

using Json = nlohmann::json;

std::string FreshDir() {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string dir =
      absl::StrCat(::testing::TempDir(), "/retrace_cli_",
                   info->test_suite_name(), "_", info->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// A 28x28 grey query image; `variant` changes its pixels (and so the class
// the fake's ReTrac finds in it).
std::string QueryPng(int variant) {
  std::vector<uint8_t> pixels(28 * 28);
  for (int y = 0; y < 28; ++y) {
    for (int x = 0; x < 28; ++x) {
      pixels[y * 28 + x] =
          static_cast<uint8_t>((x * 9 + y * 4 + variant * 37) % 256);
    }
  }
  return EncodePng(28, 28, 1, pixels);
}

// The whitespace-separated cells of the rows of the table that follows the
// line `title` (up to the next blank line), header row excluded.
std::vector<std::vector<std::string>> TableRows(const std::string& text,
                                                const std::string& title) {
  std::vector<std::vector<std::string>> rows;
  const std::vector<std::string> lines = absl::StrSplit(text, '\n');
  size_t i = 0;
  while (i < lines.size() && lines[i] != title) ++i;
  for (i += 2; i < lines.size() && !lines[i].empty(); ++i) {
    rows.push_back(absl::StrSplit(lines[i], ' ', absl::SkipEmpty()));
  }
  return rows;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<FakeServer>();
    ASSERT_TRUE(server_->ok());
    dir_ = FreshDir();
    query_ = QueryPng(0);
    query_path_ = dir_ + "/query.png";
    WriteFile(query_path_, query_);
  }

  // Runs retrace with `args`; the server and token come from the
  // environment (RETRACE_SERVER, RETRACE_TOKEN) unless `env` is given.
  ProcessResult Retrace(const std::vector<std::string>& args,
                        std::vector<std::string> env = {"default"}) {
    if (env == std::vector<std::string>{"default"}) {
      env = {absl::StrCat("RETRACE_SERVER=", server_->address()),
             absl::StrCat("RETRACE_TOKEN=", kFakeToken)};
    }
    std::vector<std::string> argv = {RETRACE_CLI_PATH};
    argv.insert(argv.end(), args.begin(), args.end());
    ProcessResult result = RunProcess(argv, env);
    // RETRACE_TEST_VERBOSE=1 shows what a user would see.
    if (std::getenv("RETRACE_TEST_VERBOSE") != nullptr) {
      std::printf("$ retrace %s\n%s%s[exit %d]\n\n",
                  absl::StrJoin(args, " ").c_str(), result.out.c_str(),
                  result.err.c_str(), result.exit_code);
    }
    return result;
  }

  std::unique_ptr<FakeServer> server_;
  std::string dir_;
  std::string query_;
  std::string query_path_;
};

TEST_F(CliTest, QueryPrintsATablePerMethod) {
  const ProcessResult r = Retrace({"query", query_path_, "--k", "5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto tracin = TableRows(r.out, "TracIn proponents (highest scores)");
  const auto retrac = TableRows(r.out, "ReTrac proponents (highest scores)");
  ASSERT_EQ(tracin.size(), 5u) << r.out;
  ASSERT_EQ(retrac.size(), 5u) << r.out;
  // rank, index, sample_id, label, name, score: TracIn's fixed list.
  EXPECT_EQ(tracin[0], (std::vector<std::string>{"1", "7", "1007", "7",
                                                 "Sneaker", "1024"}));
  EXPECT_EQ(tracin[1], (std::vector<std::string>{"2", "20", "1020", "0",
                                                 "T-shirt/top", "1008"}));
  // ReTrac leads with the query's class.
  const int32_t c = FakeQueryClass(query_);
  EXPECT_EQ(retrac[0][1], absl::StrCat(c));
  EXPECT_EQ(retrac[0][3], absl::StrCat(c));
  EXPECT_EQ(retrac[0].back(), "0.96875");
  EXPECT_TRUE(absl::StrContains(r.out, "timings: decode 0.5 ms"));
  EXPECT_FALSE(absl::StrContains(r.out, "opponents"));
  // A single image on a pipe: no progress lines.
  EXPECT_EQ(r.err, "");

  const std::vector<v1::AttributeRequest> sent =
      server_->service().attribute_requests();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].image(), query_);
  EXPECT_EQ(sent[0].top_k(), 5);
  ASSERT_EQ(sent[0].methods_size(), 2);
  EXPECT_EQ(sent[0].methods(0), v1::TRACIN);
  EXPECT_EQ(sent[0].methods(1), v1::RETRAC);
  EXPECT_FALSE(sent[0].include_thumbnails());
  EXPECT_FALSE(sent[0].include_breakdown());
  EXPECT_FALSE(sent[0].opponents());
}

TEST_F(CliTest, QueryOpponentsAndBreakdownInTables) {
  const ProcessResult r =
      Retrace({"query", query_path_, "--k", "3", "--opponents", "--breakdown"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto opponents = TableRows(r.out, "TracIn opponents (lowest scores)");
  // Each sample row is followed by its breakdown note.
  ASSERT_EQ(opponents.size(), 6u) << r.out;
  EXPECT_EQ(opponents[0], (std::vector<std::string>{"1", "54", "1054", "4",
                                                    "Coat", "-1024"}));
  // The largest terms of TracIn's first proponent: checkpoint 0, bucket 0
  // (0.75 * 0.5 * 1024 = 384), named by its timesteps from GetStoreInfo.
  EXPECT_TRUE(absl::StrContains(r.out, "top terms: ckpt 0 t0-249 +384, "))
      << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "(3 of 8)")) << r.out;
  EXPECT_EQ(server_->service().store_info_calls(), 1);
  const std::vector<v1::AttributeRequest> sent =
      server_->service().attribute_requests();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_TRUE(sent[0].opponents());
  EXPECT_TRUE(sent[0].include_breakdown());
}

TEST_F(CliTest, QueryJsonFollowsTheSchema) {
  const ProcessResult r = Retrace({"query", query_path_, "--k", "4",
                                   "--opponents", "--breakdown", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Json doc = Json::parse(r.out);
  EXPECT_EQ(doc["image"], query_path_);
  EXPECT_EQ(doc["store_id"], kFakeStoreId);
  EXPECT_EQ(doc["request_id"], "0");
  EXPECT_DOUBLE_EQ(doc["timings_ms"]["featurize"].get<double>(), 120.25);
  const int32_t c = FakeQueryClass(query_);
  for (const std::string method : {"tracin", "retrac"}) {
    SCOPED_TRACE(method);
    const Json& result = doc["results"][method];
    ASSERT_EQ(result["proponents"].size(), 4u);
    ASSERT_EQ(result["opponents"].size(), 4u);
    for (int rank = 1; rank <= 4; ++rank) {
      const Json& p = result["proponents"][rank - 1];
      const int64_t index =
          method == "tracin" ? FakeTracInIndex(rank) : FakeRetracIndex(c, rank);
      const double score =
          method == "tracin" ? FakeTracInScore(rank) : FakeRetracScore(rank);
      EXPECT_EQ(p["rank"], rank);
      EXPECT_EQ(p["index"], index);
      EXPECT_EQ(p["sample_id"], 1000 + index);
      EXPECT_EQ(p["label"], index % 10);
      EXPECT_EQ(p["label_name"], kFashionMnistNames[index % 10]);
      EXPECT_DOUBLE_EQ(p["score"].get<double>(), score);
      EXPECT_FALSE(p.contains("thumbnail_png_base64"));
      ASSERT_EQ(p["breakdown"].size(),
                static_cast<size_t>(kFakeCheckpoints * kFakeBuckets));
      double sum = 0;
      for (const Json& term : p["breakdown"]) {
        EXPECT_TRUE(term.contains("checkpoint"));
        EXPECT_TRUE(term.contains("slot"));
        sum += term["value"].get<double>();
      }
      EXPECT_DOUBLE_EQ(sum, score);
      EXPECT_DOUBLE_EQ(result["opponents"][rank - 1]["score"].get<double>(),
                       -score);
    }
  }
  // --json needs no slot names: no extra GetStoreInfo call.
  EXPECT_EQ(server_->service().store_info_calls(), 0);
}

TEST_F(CliTest, QueryJsonWithoutOpponentsHasEmptyLists) {
  const ProcessResult r = Retrace({"query", query_path_, "--k", "2", "--method",
                                   "retrac", "--json", "--thumbnails"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Json doc = Json::parse(r.out);
  EXPECT_FALSE(doc["results"].contains("tracin"));
  EXPECT_TRUE(doc["results"]["retrac"]["opponents"].empty());
  const Json& first = doc["results"]["retrac"]["proponents"][0];
  EXPECT_FALSE(first.contains("breakdown"));
  // Thumbnails come back base64-encoded and decode to the fake's PNG.
  ASSERT_TRUE(first.contains("thumbnail_png_base64"));
  EXPECT_FALSE(first["thumbnail_png_base64"].get<std::string>().empty());
}

TEST_F(CliTest, QueryForwardsEveryOption) {
  const ProcessResult r = Retrace({"query",
                                   query_path_,
                                   "-k",
                                   "7",
                                   "--method",
                                   "retrac",
                                   "--pairing",
                                   "matched",
                                   "--checkpoints",
                                   "1",
                                   "--buckets",
                                   "0,2-3",
                                   "--query-timesteps",
                                   "3",
                                   "--noise-draws",
                                   "8",
                                   "--seed",
                                   "12345678901",
                                   "--thumbnails",
                                   "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<v1::AttributeRequest> sent =
      server_->service().attribute_requests();
  ASSERT_EQ(sent.size(), 1u);
  const v1::AttributeRequest& q = sent[0];
  EXPECT_EQ(q.top_k(), 7);
  ASSERT_EQ(q.methods_size(), 1);
  EXPECT_EQ(q.methods(0), v1::RETRAC);
  EXPECT_EQ(q.pairing(), v1::MATCHED);
  EXPECT_EQ(
      std::vector<int32_t>(q.checkpoints().begin(), q.checkpoints().end()),
      std::vector<int32_t>({1}));
  EXPECT_EQ(std::vector<int32_t>(q.buckets().begin(), q.buckets().end()),
            std::vector<int32_t>({0, 2, 3}));
  EXPECT_EQ(q.query_timesteps(), 3);
  EXPECT_EQ(q.query_noise_draws(), 8);
  EXPECT_EQ(q.seed(), 12345678901u);
  EXPECT_TRUE(q.include_thumbnails());
}

TEST_F(CliTest, ConnectionFlagsAfterTheSubcommandWork) {
  const ProcessResult r =
      Retrace({"query", query_path_, "--server", server_->address(), "--token",
               kFakeToken, "--timeout", "30"},
              /*env=*/{});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(CliTest, TokenFileSkipsCommentsAndBlankLines) {
  const std::string token_file = dir_ + "/tokens";
  WriteFile(token_file,
            absl::StrCat("# retraced tokens\n\n  ", kFakeToken, "  \n"));
  const ProcessResult r = Retrace(
      {"--server", server_->address(), "--token-file", token_file, "info"},
      /*env=*/{});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const ProcessResult from_env =
      Retrace({"info"}, {absl::StrCat("RETRACE_SERVER=", server_->address()),
                         absl::StrCat("RETRACE_TOKEN_FILE=", token_file)});
  EXPECT_EQ(from_env.exit_code, 0) << from_env.err;
}

TEST_F(CliTest, UsageErrorsExitWithTwoAndSendNothing) {
  const std::vector<std::vector<std::string>> cases = {
      {"query", query_path_, "--no-such-flag"},
      {"query", dir_ + "/missing.png"},
      {"query", query_path_, "--k", "abc"},
      {"query", query_path_, "--k", "0"},
      {"query", query_path_, "--method", "both-and-more"},
      {"query", query_path_, "--pairing", "random"},
      {"query", query_path_, "--buckets", "2-x"},
      {"query", query_path_, "--checkpoints", "-1"},
      {"query", query_path_, "--timeout", "soon"},
      {"query"},
      {"self-influence", "--top", "0"},
      {"frobnicate"},
      {},
      {"query", query_path_, "--token", "a", "--token-file", query_path_},
      {"query", query_path_, "--token-file", dir_ + "/no-token-file"},
      {"query", query_path_, "--ca", dir_ + "/no-ca.pem"},
      {"query", query_path_, "--cert", query_path_},
  };
  for (const std::vector<std::string>& args : cases) {
    const ProcessResult r = Retrace(args);
    SCOPED_TRACE(absl::StrJoin(args, " "));
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_FALSE(r.err.empty());
  }
  EXPECT_TRUE(server_->service().attribute_requests().empty());
  const ProcessResult missing = Retrace({"query", dir_ + "/missing.png"});
  EXPECT_TRUE(absl::StrContains(missing.err, "missing.png")) << missing.err;
}

TEST_F(CliTest, HelpExitsWithZero) {
  const ProcessResult r = Retrace({"query", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.out, "--opponents"));
}

struct ServerErrorCase {
  std::string name;
  std::vector<std::string> args;  // after "query <image>"
  std::string code;
  std::string server_text;
};

TEST_F(CliTest, ServerErrorsExitWithThreeAndNameTheCode) {
  const std::string not_an_image = dir_ + "/notes.txt";
  WriteFile(not_an_image, "just some text, not a picture");
  const std::vector<ServerErrorCase> cases = {
      {"bad image bytes",
       {not_an_image},
       "INVALID_ARGUMENT",
       "neither PNG nor JPEG"},
      {"k above N",
       {query_path_, "--k", "100"},
       "INVALID_ARGUMENT",
       "top_k must be in 1..60"},
      {"replay without a replay slot",
       {query_path_, "--pairing", "replay"},
       "INVALID_ARGUMENT",
       "needs a store with a replay slot"},
      {"bucket out of range",
       {query_path_, "--buckets", "9"},
       "INVALID_ARGUMENT",
       "buckets: 9 is out of range"},
      {"wrong token",
       {query_path_, "--token", "not-the-token"},
       "UNAUTHENTICATED",
       "the bearer token is not valid"},
      {"queue full",
       {query_path_, "--seed", absl::StrCat(kFakeSeedQueueFull)},
       "RESOURCE_EXHAUSTED",
       "the scoring queue is full"},
      {"loading",
       {query_path_, "--seed", absl::StrCat(kFakeSeedLoading)},
       "UNAVAILABLE",
       "the server is loading its store"},
  };
  for (const ServerErrorCase& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<std::string> args = {"query"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const ProcessResult r = Retrace(args);
    EXPECT_EQ(r.exit_code, 3) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, absl::StrCat(c.code, ": "))) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, c.server_text)) << r.err;
    EXPECT_EQ(r.out, "");
  }
}

TEST_F(CliTest, MissingTokenIsUnauthenticated) {
  const ProcessResult r =
      Retrace({"info"}, {absl::StrCat("RETRACE_SERVER=", server_->address())});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(
      absl::StrContains(r.err, "UNAUTHENTICATED: missing 'authorization"))
      << r.err;
}

TEST_F(CliTest, DeadlineExceededWhenTheServerIsSlow) {
  const ProcessResult r =
      Retrace({"query", query_path_, "--seed", absl::StrCat(kFakeSeedSlow),
               "--timeout", "0.5"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(r.err, "DEADLINE_EXCEEDED")) << r.err;
  // The client gives up at its deadline, not when the server would finish.
  EXPECT_LT(r.seconds, 10.0);
}

TEST_F(CliTest, UnreachableServerIsUnavailable) {
  // A port that was just free: take one from a server and shut it down.
  std::string address;
  {
    FakeServer gone;
    address = gone.address();
  }
  const ProcessResult r =
      Retrace({"query", query_path_, "--timeout", "10"},
              {absl::StrCat("RETRACE_SERVER=", address), "RETRACE_TOKEN=x"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(r.err, "UNAVAILABLE: ")) << r.err;
  const ProcessResult health =
      Retrace({"health", "--timeout", "10"},
              {absl::StrCat("RETRACE_SERVER=", address)});
  EXPECT_EQ(health.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(health.err, "UNAVAILABLE")) << health.err;
}

TEST_F(CliTest, SeveralImagesGiveJsonLinesAndGoOnAfterABadOne) {
  const std::string second = dir_ + "/second.png";
  WriteFile(second, QueryPng(1));
  const std::string broken = dir_ + "/broken.png";
  WriteFile(broken, "\x89PN");  // truncated: not even a PNG signature
  const ProcessResult r =
      Retrace({"query", query_path_, broken, second, "--k", "3", "--json"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  const std::vector<std::string> lines =
      absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << r.out;
  const Json first = Json::parse(lines[0]);
  const Json failed = Json::parse(lines[1]);
  const Json third = Json::parse(lines[2]);
  EXPECT_EQ(first["image"], query_path_);
  EXPECT_EQ(failed["image"], broken);
  EXPECT_EQ(failed["error"]["code"], "INVALID_ARGUMENT");
  EXPECT_TRUE(absl::StrContains(failed["error"]["message"].get<std::string>(),
                                "neither PNG nor JPEG"));
  EXPECT_EQ(third["image"], second);
  EXPECT_EQ(third["request_id"], "2");
  EXPECT_EQ(third["results"]["retrac"]["proponents"][0]["label"],
            FakeQueryClass(QueryPng(1)));
  // Progress goes to stderr, one line per image on a pipe.
  EXPECT_TRUE(absl::StrContains(r.err, "retrace query: 1/3 " + query_path_));
  EXPECT_TRUE(absl::StrContains(r.err, "retrace query: 3/3 " + second));
  EXPECT_TRUE(absl::StrContains(r.err, broken + ": INVALID_ARGUMENT: "));
}

TEST_F(CliTest, SeveralImagesStopAtAServerWideError) {
  const std::string second = dir_ + "/second.png";
  WriteFile(second, QueryPng(1));
  const ProcessResult r =
      Retrace({"query", query_path_, second, "--seed",
               absl::StrCat(kFakeSeedQueueFull), "--no-progress"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(server_->service().attribute_requests().size(), 1u);
  EXPECT_TRUE(absl::StrContains(r.err, "1 image(s) not sent")) << r.err;
}

TEST_F(CliTest, HealthReportsServingAndNotServing) {
  ProcessResult r = Retrace({"health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  server_->SetServing(false);
  r = Retrace({"health"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  // The standard health service answers NOT_FOUND for unknown names.
  r = Retrace({"health", "--service", "no.such.Service"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(r.err, "NOT_FOUND")) << r.err;
}

TEST_F(CliTest, HealthNeedsNoToken) {
  const ProcessResult r = Retrace(
      {"health"}, {absl::StrCat("RETRACE_SERVER=", server_->address())});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(CliTest, InfoPrintsSummaryDiagnosticsAndSpearman) {
  const ProcessResult r = Retrace({"info"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, kFakeStoreId));
  EXPECT_TRUE(absl::StrContains(r.out, "samples      60")) << r.out;
  const auto norms = TableRows(
      r.out,
      "Gradient norm |g| per checkpoint and slot (timestep-induced bias)");
  ASSERT_EQ(norms.size(), 8u) << r.out;
  // ckpt, slot, timesteps, mean, median, p95 for checkpoint 0, bucket 1:
  // median 64 / 4 = 16.
  EXPECT_EQ(norms[1],
            (std::vector<std::string>{"0", "1", "250-499", "20", "16", "48"}));
  const auto spearman = TableRows(
      r.out, "Spearman correlation of timestep and |g| per checkpoint");
  ASSERT_EQ(spearman.size(), 2u) << r.out;
  // Medians 64..1 for checkpoint 0: max/min = 64.
  EXPECT_EQ(spearman[0], (std::vector<std::string>{"0", "-0.875", "64"}));
  EXPECT_EQ(spearman[1], (std::vector<std::string>{"1", "-0.750", "64"}));
}

TEST_F(CliTest, InfoJson) {
  const ProcessResult r = Retrace({"info", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Json doc = Json::parse(r.out);
  EXPECT_EQ(doc["store_id"], kFakeStoreId);
  EXPECT_EQ(doc["num_samples"], kFakeSamples);
  EXPECT_EQ(doc["num_buckets"], kFakeBuckets);
  EXPECT_EQ(doc["has_replay"], false);
  EXPECT_EQ(doc["bucket_edges"], Json({0, 250, 500, 750, 1000}));
  EXPECT_EQ(doc["image_shape"], Json({1, 28, 28}));
  ASSERT_EQ(doc["diagnostics"].size(), 8u);
  const Json& d = doc["diagnostics"][5];  // checkpoint 1, bucket 1
  EXPECT_EQ(d["checkpoint"], 1);
  EXPECT_EQ(d["slot"], 1);
  EXPECT_EQ(d["replay"], false);
  EXPECT_DOUBLE_EQ(d["norm_median"].get<double>(), 8.0);
  EXPECT_DOUBLE_EQ(doc["spearman_timestep_norm"][1].get<double>(), -0.75);
}

TEST_F(CliTest, SelfInfluencePagesUntilTop) {
  const ProcessResult r =
      Retrace({"self-influence", "--top", "25", "--page-size", "10", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Json doc = Json::parse(r.out);
  EXPECT_EQ(doc["method"], "retrac");
  ASSERT_EQ(doc["samples"].size(), 25u);
  for (int rank = 1; rank <= 25; ++rank) {
    const Json& s = doc["samples"][rank - 1];
    EXPECT_EQ(s["rank"], rank);
    EXPECT_EQ(s["index"], FakeSelfInfluenceIndex(rank));
    EXPECT_DOUBLE_EQ(s["score"].get<double>(), FakeSelfInfluenceScore(rank));
  }
  const std::vector<v1::SelfInfluenceRequest> sent =
      server_->service().self_influence_requests();
  ASSERT_EQ(sent.size(), 3u);
  EXPECT_EQ(sent[0].page_token(), "");
  EXPECT_EQ(sent[1].page_token(), "page:10");
  EXPECT_EQ(sent[2].page_size(), 5);  // only what is still wanted
  EXPECT_EQ(sent[0].method(), v1::RETRAC);
}

TEST_F(CliTest, SelfInfluenceStopsAtTheEndOfTheStore) {
  const ProcessResult r =
      Retrace({"self-influence", "--top", "500", "--method", "tracin"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto rows = TableRows(
      r.out, "TracIn self-influence (highest first; outlier candidates)");
  ASSERT_EQ(rows.size(), static_cast<size_t>(kFakeSamples));
  EXPECT_EQ(rows[0], (std::vector<std::string>{"1", "0", "1000", "0",
                                               "T-shirt/top", "25600"}));
  EXPECT_EQ(server_->service().self_influence_requests().size(), 1u);
}

TEST_F(CliTest, SheetIsAPngOfTheDocumentedSize) {
  const std::string sheet = dir_ + "/sheet.png";
  const ProcessResult r = Retrace(
      {"query", query_path_, "--k", "10", "--opponents", "--sheet", sheet});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<v1::AttributeRequest> sent =
      server_->service().attribute_requests();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_TRUE(sent[0].include_thumbnails());
  const std::string png = ReadFileOrDie(sheet);
  int width = 0, height = 0, channels = 0;
  ASSERT_TRUE(stbi_info_from_memory(
      reinterpret_cast<const stbi_uc*>(png.data()),
      static_cast<int>(png.size()), &width, &height, &channels));
  // docs/cli.md: 10 thumbnails in 2 rows of 5, both lists, two panels.
  EXPECT_EQ(width, 1152);
  EXPECT_EQ(height, 610);
  EXPECT_TRUE(absl::StrContains(r.err, "contact sheet " + sheet));
}

TEST_F(CliTest, SheetPerImageWithSuffixes) {
  const std::string second = dir_ + "/second.png";
  WriteFile(second, QueryPng(1));
  const ProcessResult r = Retrace(
      {"query", query_path_, second, "--k", "3", "--sheet", dir_ + "/out.png"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/out-1.png"));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/out-2.png"));
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/out.png"));
}

TEST_F(CliTest, SheetWithAMissingFontIsAUsageError) {
  const ProcessResult r =
      Retrace({"query", query_path_, "--sheet", dir_ + "/s.png", "--font",
               dir_ + "/no-font.ttf"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(r.err, "fonts-dejavu-core")) << r.err;
  EXPECT_TRUE(server_->service().attribute_requests().empty());
}

TEST_F(CliTest, SheetThatCannotBeWrittenExitsWithOne) {
  const ProcessResult r = Retrace(
      {"query", query_path_, "--sheet", dir_ + "/no/such/dir/sheet.png"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "cannot write the contact sheet"));
  // The table was printed all the same.
  EXPECT_TRUE(absl::StrContains(r.out, "TracIn proponents"));
}

// TLS and mutual TLS, with certificates made by openssl for this test.
class CliTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = FreshDir();
    const std::string script = absl::StrCat(
        "cd '", dir_, "' && (",
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
        "-nodes -days 2 -subj /CN=test-ca "
        "-keyout ca.key -out ca.pem && ",
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
        "-subj /CN=localhost "
        "-keyout server.key -out server.csr && ",
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext && ",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
        "-CAcreateserial -days 2 -extfile san.ext -out server.pem && ",
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
        "-subj /CN=client "
        "-keyout client.key -out client.csr && ",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key "
        "-CAcreateserial -days 2 -out client.pem",
        ") > openssl.log 2>&1");
    if (std::system(script.c_str()) != 0) {
      GTEST_SKIP() << "openssl could not make test certificates; see " << dir_
                   << "/openssl.log";
    }
  }

  std::string Pem(const std::string& name) {
    return ReadFileOrDie(dir_ + "/" + name);
  }

  ProcessResult Retrace(const FakeServer& server,
                        const std::vector<std::string>& args) {
    std::vector<std::string> argv = {RETRACE_CLI_PATH, "--server",
                                     server.address(), "--token", kFakeToken};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunProcess(argv);
  }

  std::string dir_;
};

TEST_F(CliTlsTest, TlsWithTheRightCa) {
  FakeServerOptions options;
  options.cert_pem = Pem("server.pem");
  options.key_pem = Pem("server.key");
  FakeServer server(options);
  ASSERT_TRUE(server.ok());
  ProcessResult r = Retrace(server, {"--ca", dir_ + "/ca.pem", "info"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // Plaintext against a TLS port fails as UNAVAILABLE.
  r = Retrace(server, {"--timeout", "10", "info"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(r.err, "UNAVAILABLE")) << r.err;
  // A certificate that names another host is rejected, unless the expected
  // name is given.
  r = Retrace(server, {"--ca", dir_ + "/ca.pem", "--tls-server-name",
                       "other.example", "--timeout", "10", "info"});
  EXPECT_EQ(r.exit_code, 3);
  r = Retrace(server, {"--ca", dir_ + "/ca.pem", "--tls-server-name",
                       "localhost", "info"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(CliTlsTest, MutualTlsNeedsTheClientCertificate) {
  FakeServerOptions options;
  options.cert_pem = Pem("server.pem");
  options.key_pem = Pem("server.key");
  options.client_ca_pem = Pem("ca.pem");
  FakeServer server(options);
  ASSERT_TRUE(server.ok());
  ProcessResult r =
      Retrace(server, {"--ca", dir_ + "/ca.pem", "--timeout", "10", "health"});
  EXPECT_EQ(r.exit_code, 3);
  r = Retrace(server, {"--ca", dir_ + "/ca.pem", "--cert", dir_ + "/client.pem",
                       "--key", dir_ + "/client.key", "health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
}

}  // namespace
}  // namespace retrace::client::testing

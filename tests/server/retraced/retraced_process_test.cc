// The retraced binary as operators run it: serves a store made in the test,
// is scraped by Debian's real Prometheus (a counter read back through its
// HTTP API), and on SIGTERM finishes the request in flight and exits 0.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "retrace/v1/attribution.grpc.pb.h"
#include "server/model/device.h"
#include "tests/server/metrics/prometheus_harness.h"
#include "tests/server/service/served_store.h"

namespace retrace::service {
namespace {

class Retraced {
 public:
  // `model`: the --model argument; empty: the shared store's run directory.
  explicit Retraced(std::vector<std::string> extra, std::string model = "") {
    const auto& s = testing::SharedStore();
    if (model.empty()) model = s.run_dir;
    dir_ = ::testing::TempDir() + "/retraced-proc-" + std::to_string(getpid());
    std::filesystem::create_directories(dir_);
    std::filesystem::remove(dir_ + "/port");
    std::vector<std::string> args = {RETRACED_BINARY,
                                     "--store",
                                     s.store_dir,
                                     "--model",
                                     model,
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--port-file",
                                     dir_ + "/port",
                                     "--threads",
                                     "1",
                                     "--drain-timeout-s",
                                     "600"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = fork();
    if (pid_ == 0) {
      const std::string log = dir_ + "/log";
      freopen(log.c_str(), "w", stderr);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Retraced() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // Waits for the port file and for health SERVING (through a call that
  // succeeds: GetStoreInfo is UNAVAILABLE until the store is loaded).
  int WaitReady() {
    const auto until =
        std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < until) {
      std::ifstream in(dir_ + "/port");
      int port = 0;
      if (in >> port && port > 0) {
        auto stub = StubFor(port);
        grpc::ClientContext context;
        v1::StoreInfo info;
        if (stub->GetStoreInfo(&context, {}, &info).ok()) return port;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "retraced did not become ready: " << Log();
    return 0;
  }
  static std::unique_ptr<v1::Attribution::Stub> StubFor(int port) {
    return v1::Attribution::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
  // The exit status once the process ends by itself (−1 after 120 s).
  int WaitExit() {
    const auto until =
        std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < until) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }
  // The exit status after SIGTERM.
  int Terminate(std::thread* in_flight = nullptr) {
    kill(pid_, SIGTERM);
    if (in_flight != nullptr) in_flight->join();
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }
  std::string Log() const { return testing::ReadAll(dir_ + "/log"); }
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  pid_t pid_ = -1;
};

v1::AttributeRequest ImageRequest(int timesteps, int draws) {
  v1::AttributeRequest r;
  r.set_image(testing::QueryPng(1));
  r.set_top_k(3);
  r.set_query_timesteps(timesteps);
  r.set_query_noise_draws(draws);
  return r;
}

// A model description whose checkpoint changed since the store was built
// (its recorded sha256 no longer matches) stops retraced at start-up with
// exit 1 and a message naming the description and the field.
TEST(RetracedProcessTest, RefusesAChangedCheckpointAtStartUp) {
  const auto& s = testing::SharedStore();
  const std::string dir =
      ::testing::TempDir() + "/retraced-bad-model-" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  std::string text = testing::ReadAll(s.run_dir + "/model.toml");
  const size_t at = text.find("sha256 = \"");
  ASSERT_NE(at, std::string::npos) << text;
  const size_t digit = at + std::string("sha256 = \"").size();
  text[digit] = text[digit] == '0' ? '1' : '0';
  // Paths in the copy are relative to its own folder: point them back.
  size_t pos = 0;
  while ((pos = text.find("file = \"", pos)) != std::string::npos) {
    pos += std::string("file = \"").size();
    text.insert(pos, s.run_dir + "/");
  }
  const size_t run = text.find("run = \".\"");
  ASSERT_NE(run, std::string::npos) << text;
  text.replace(run, std::string("run = \".\"").size(),
               "run = \"" + s.run_dir + "\"");
  const std::string model = dir + "/model.toml";
  std::ofstream(model) << text;
  Retraced server({"--metrics-port", "-1"}, model);
  const int status = server.WaitExit();
  ASSERT_TRUE(WIFEXITED(status)) << server.Log();
  EXPECT_EQ(WEXITSTATUS(status), 1) << server.Log();
  EXPECT_NE(server.Log().find(model + ": field 'checkpoints[0].sha256'"),
            std::string::npos)
      << server.Log();
}

// --featurize-device cuda where CUDA cannot run stops start-up with exit 1
// and the reason, before the store is read.
TEST(RetracedProcessTest, RefusesFeaturizeDeviceCudaWithoutCuda) {
  if (model::TorchBuiltWithCuda() && model::CudaDeviceCount() > 0) {
    GTEST_SKIP() << "a CUDA device is usable here";
  }
  Retraced server({"--metrics-port", "-1", "--featurize-device", "cuda"});
  const int status = server.WaitExit();
  ASSERT_TRUE(WIFEXITED(status)) << server.Log();
  EXPECT_EQ(WEXITSTATUS(status), 1) << server.Log();
  EXPECT_NE(server.Log().find("FAILED_PRECONDITION"), std::string::npos)
      << server.Log();
  EXPECT_NE(
      server.Log().find(model::TorchBuiltWithCuda() ? "no CUDA device"
                                                    : "built without CUDA"),
      std::string::npos)
      << server.Log();
}

TEST(RetracedProcessTest, SigtermFinishesTheRequestInFlightAndExitsZero) {
  Retraced server({"--metrics-port", "-1"});
  const int port = server.WaitReady();
  ASSERT_GT(port, 0);
  auto stub = Retraced::StubFor(port);
  // A slow request (many query draws) is in flight when SIGTERM arrives.
  // The drain timeout (600 s) is far above what it takes even under the
  // sanitizers on a loaded machine: this checks that draining waits for it.
  grpc::Status in_flight_status;
  v1::AttributeResponse in_flight_response;
  std::atomic<bool> sent{false};
  std::thread in_flight([&] {
    grpc::ClientContext context;
    sent = true;
    in_flight_status =
        stub->Attribute(&context, ImageRequest(16, 16), &in_flight_response);
  });
  while (!sent) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int status = server.Terminate(&in_flight);
  EXPECT_TRUE(in_flight_status.ok()) << in_flight_status.error_message();
  ASSERT_EQ(in_flight_response.results_size(), 2);
  EXPECT_EQ(in_flight_response.results(0).proponents_size(), 3);
  ASSERT_TRUE(WIFEXITED(status)) << server.Log();
  EXPECT_EQ(WEXITSTATUS(status), 0) << server.Log();
  EXPECT_NE(server.Log().find("draining"), std::string::npos) << server.Log();
  // Nobody listens any more.
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(2));
  v1::StoreInfo info;
  EXPECT_FALSE(stub->GetStoreInfo(&context, {}, &info).ok());
}

TEST(RetracedProcessTest, PrometheusScrapesTheRequestCounter) {
  if (!retrace::testing::PrometheusAvailable()) {
    GTEST_SKIP() << retrace::testing::kPrometheusBinary
                 << " is not installed (Debian package prometheus)";
  }
  auto metrics_port = retrace::testing::PickFreePort();
  ASSERT_TRUE(metrics_port.ok());
  Retraced server({"--metrics-port", std::to_string(*metrics_port),
                   "--metrics-host", "127.0.0.1"});
  const int port = server.WaitReady();
  ASSERT_GT(port, 0);
  auto stub = Retraced::StubFor(port);
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext context;
    v1::AttributeResponse response;
    ASSERT_TRUE(stub->Attribute(&context, ImageRequest(1, 1), &response).ok());
  }
  {
    grpc::ClientContext context;
    v1::AttributeRequest bad = ImageRequest(1, 1);
    bad.set_top_k(-3);
    v1::AttributeResponse response;
    EXPECT_EQ(stub->Attribute(&context, bad, &response).error_code(),
              grpc::INVALID_ARGUMENT);
  }
  auto prometheus = retrace::testing::PrometheusProcess::Start(
      {absl::StrCat("127.0.0.1:", *metrics_port)});
  ASSERT_TRUE(prometheus.ok()) << prometheus.status();
  auto ok_count = retrace::testing::WaitForPrometheusScalar(
      (*prometheus)->port(),
      "retrace_requests_total{method=\"Attribute\",code=\"OK\"}", 3.0,
      absl::Seconds(60));
  EXPECT_TRUE(ok_count.ok()) << ok_count.status() << "\n"
                             << (*prometheus)->LogTail();
  auto bad_count = retrace::testing::WaitForPrometheusScalar(
      (*prometheus)->port(),
      "retrace_requests_total{method=\"Attribute\",code=\"INVALID_ARGUMENT\"}",
      1.0, absl::Seconds(30));
  EXPECT_TRUE(bad_count.ok()) << bad_count.status();
  auto samples = retrace::testing::QueryPrometheusScalar(
      (*prometheus)->port(), "retrace_store_samples");
  ASSERT_TRUE(samples.ok()) << samples.status();
  EXPECT_EQ(*samples, 40);
  EXPECT_EQ(server.Terminate(), 0);
}

std::string RunCommand(const std::string& command, int* exit_code) {
  const std::string out = ::testing::TempDir() + "/retraced-cmd-" +
                          std::to_string(getpid()) + ".txt";
  const int status = std::system((command + " > " + out + " 2>&1").c_str());
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return testing::ReadAll(out);
}

// The retrace CLI against the real server: a table, JSON with the server's
// answer, a server error as exit 3 with the code name, a contact sheet.
TEST(RetracedProcessTest, CliAgainstTheServer) {
  Retraced server({"--metrics-port", "-1"});
  const int port = server.WaitReady();
  ASSERT_GT(port, 0);
  const std::string dir =
      ::testing::TempDir() + "/retraced-cli-" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  const std::string png = testing::QueryPng(3);
  std::ofstream(dir + "/query.png", std::ios::binary) << png;
  v1::AttributeRequest request;
  request.set_image(png);
  request.set_top_k(3);
  grpc::ClientContext context;
  v1::AttributeResponse want;
  ASSERT_TRUE(
      Retraced::StubFor(port)->Attribute(&context, request, &want).ok());

  const std::string cli =
      absl::StrCat(RETRACE_CLI_BINARY, " --server 127.0.0.1:", port, " ");
  int code = -1;
  std::string out =
      RunCommand(cli + "query --k 3 " + dir + "/query.png", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("TracIn proponents"), std::string::npos) << out;
  EXPECT_NE(out.find("ReTrac proponents"), std::string::npos) << out;

  out = RunCommand(cli + "query --json --k 3 " + dir + "/query.png", &code);
  ASSERT_EQ(code, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j["store_id"], want.store_id());
  for (const v1::MethodResult& m : want.results()) {
    const std::string key = m.method() == v1::TRACIN ? "tracin" : "retrac";
    const nlohmann::json& got = j["results"][key]["proponents"];
    ASSERT_EQ(got.size(), 3u) << out;
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(got[i]["index"].get<int64_t>(), m.proponents(i).index());
      EXPECT_FLOAT_EQ(got[i]["score"].get<float>(), m.proponents(i).score());
      EXPECT_EQ(got[i]["label_name"], m.proponents(i).label_name());
    }
  }

  out = RunCommand(cli + "query --k 41 " + dir + "/query.png", &code);
  EXPECT_EQ(code, 3) << out;
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
  EXPECT_NE(out.find("top_k must be in 1..40"), std::string::npos) << out;

  out = RunCommand(cli + "query --k 2 --opponents --sheet " + dir +
                       "/sheet.png " + dir + "/query.png",
                   &code);
  EXPECT_EQ(code, 0) << out;
  const std::string sheet = testing::ReadAll(dir + "/sheet.png");
  ASSERT_GT(sheet.size(), 8u) << out;
  EXPECT_EQ(sheet.substr(1, 3), "PNG");

  out = RunCommand(cli + "health", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("SERVING"), std::string::npos) << out;
  out = RunCommand(cli + "info", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find(want.store_id()), std::string::npos) << out;
  EXPECT_EQ(server.Terminate(), 0);
}

// client/python's example against the real server: the proponents it prints
// are the ones the C++ stub gets for the same request.
TEST(RetracedProcessTest, PythonClientExampleGetsTheServersAnswer) {
  if (access("/usr/bin/python3", X_OK) != 0) {
    GTEST_SKIP() << "/usr/bin/python3 is not installed";
  }
  Retraced server({"--metrics-port", "-1"});
  const int port = server.WaitReady();
  ASSERT_GT(port, 0);
  const std::string dir =
      ::testing::TempDir() + "/retraced-py-" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  const std::string png = testing::QueryPng(2);
  std::ofstream(dir + "/query.png", std::ios::binary) << png;

  v1::AttributeRequest request;
  request.set_image(png);
  request.set_top_k(4);
  grpc::ClientContext context;
  v1::AttributeResponse want;
  ASSERT_TRUE(
      Retraced::StubFor(port)->Attribute(&context, request, &want).ok());

  const std::string out = dir + "/out.txt";
  const std::string command = absl::StrCat(
      "RETRACE_PY_STUBS=", PY_STUBS_DIR, " /usr/bin/python3 ", SOURCE_DIR,
      "/client/python/example.py --server 127.0.0.1:", port, " --top-k 4 ", dir,
      "/query.png > ", out, " 2>&1");
  ASSERT_EQ(std::system(command.c_str()), 0) << testing::ReadAll(out);
  const std::string printed = testing::ReadAll(out);
  ASSERT_EQ(want.results_size(), 2);
  for (const v1::MethodResult& m : want.results()) {
    for (const v1::AttributedSample& s : m.proponents()) {
      // "  rank  index ..." rows: the rank and the index as printed.
      const std::string row = absl::StrFormat("  %4d  %8d  %14d", s.rank(),
                                              s.index(), s.sample_id());
      EXPECT_NE(printed.find(row), std::string::npos) << row << "\n" << printed;
    }
  }
  EXPECT_EQ(server.Terminate(), 0);
}

// Overload and abuse over loopback (abuse_client.py): limits far below the
// traffic (4 concurrent calls, 8 queued queries, 1 MiB messages), a mix of
// valid requests (answered exactly as when alone, or RESOURCE_EXHAUSTED),
// invalid ones (INVALID_ARGUMENT), vanishing and slow stream clients and
// bursts, for 40 s; the server never exits and its resident memory ends
// within 256 MiB of where it was after the first 10 s.
TEST(RetracedProcessTest, OverloadAndAbuseOverLoopback) {
  if (access("/usr/bin/python3", X_OK) != 0) {
    GTEST_SKIP() << "/usr/bin/python3 is not installed";
  }
  Retraced server({"--metrics-port", "-1", "--max-concurrent", "4",
                   "--max-queue", "8", "--max-message-bytes", "1048576"});
  const int port = server.WaitReady();
  ASSERT_GT(port, 0);
  const std::string out = server.dir() + "/abuse.txt";
  const std::string report = server.dir() + "/abuse.json";
  const std::string command = absl::StrCat(
      "/usr/bin/python3 ", SOURCE_DIR,
      "/tests/server/retraced/abuse_client.py --address 127.0.0.1:", port,
      " --pid ", server.pid(), " --shape 1,28,28 --pb-dir ", PY_STUBS_DIR,
      " --seconds 40 --threads 6 --burst 4 --rss-interval 10",
      " --max-message-bytes 1048576 --report ", report, " > ", out, " 2>&1");
  ASSERT_EQ(std::system(command.c_str()), 0)
      << testing::ReadAll(out) << "\nserver log:\n"
      << server.Log();
  const nlohmann::json summary =
      nlohmann::json::parse(testing::ReadAll(report));
  const auto& rss = summary.at("rss_kib");
  ASSERT_GE(rss.size(), 3u) << summary.dump();
  const int64_t warm = rss[1].at("rss_kib").get<int64_t>();
  const int64_t last = rss.back().at("rss_kib").get<int64_t>();
  EXPECT_LT(last - warm, 256 * 1024) << summary.dump();
  std::cout << testing::ReadAll(out);
  EXPECT_EQ(server.Terminate(), 0);
}

}  // namespace
}  // namespace retrace::service

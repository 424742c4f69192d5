// retraced's flags and TOML file: defaults, the file's values, flags
// overriding the file, and errors naming the file and key.
#include "server/retraced/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <vector>

namespace retrace::retraced {
namespace {

std::optional<int> Parse(std::vector<std::string> args, ServerConfig* config,
                         std::string* err_text = nullptr,
                         std::string* out_text = nullptr) {
  args.insert(args.begin(), "retraced");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  auto r = ParseServerConfig(static_cast<int>(argv.size()), argv.data(), config,
                             out, err);
  if (err_text != nullptr) *err_text = err.str();
  if (out_text != nullptr) *out_text = out.str();
  return r;
}

std::string WriteToml(const std::string& text) {
  const std::string path =
      ::testing::TempDir() + "/retraced-" + std::to_string(getpid()) + ".toml";
  std::ofstream(path) << text;
  return path;
}

TEST(ConfigTest, Defaults) {
  ServerConfig c;
  EXPECT_FALSE(Parse({"--store", "/s"}, &c).has_value());
  EXPECT_EQ(c.store_dir, "/s");
  EXPECT_EQ(c.listen, "0.0.0.0:50051");
  EXPECT_EQ(c.metrics_port, 9464);
  EXPECT_EQ(c.max_batch, 32);
  EXPECT_TRUE(c.thumbnails);
  EXPECT_TRUE(c.verify_checksums);
}

TEST(ConfigTest, FlagsOverrideTheFile) {
  const std::string path = WriteToml(
      "store = \"/from-file\"\nmax-batch = 8\nmax-queue-delay-us = 500\n"
      "thumbnails = false\ndrain-timeout-s = 2.5\ndevice = \"cpu\"\n");
  ServerConfig c;
  EXPECT_FALSE(Parse({"--config", path, "--max-batch", "16"}, &c).has_value());
  EXPECT_EQ(c.store_dir, "/from-file");
  EXPECT_EQ(c.max_batch, 16);  // the flag wins
  EXPECT_EQ(c.max_queue_delay_us, 500);
  EXPECT_FALSE(c.thumbnails);
  EXPECT_DOUBLE_EQ(c.drain_timeout_s, 2.5);
  EXPECT_EQ(c.device, "cpu");
  ServerConfig d;
  EXPECT_FALSE(Parse({"--thumbnails", "--config=" + path}, &d).has_value());
  EXPECT_TRUE(d.thumbnails);
}

TEST(ConfigTest, ErrorsNameTheProblem) {
  ServerConfig c;
  std::string err;
  EXPECT_EQ(Parse({}, &c, &err), 2);
  EXPECT_NE(err.find("--store"), std::string::npos) << err;
  EXPECT_EQ(Parse({"--store", "/s", "--max-batch", "65"}, &c, &err), 2);
  EXPECT_NE(err.find("max-batch"), std::string::npos) << err;
  EXPECT_EQ(Parse({"--store", "/s", "--device", "tpu"}, &c, &err), 2);
  EXPECT_NE(err.find("tpu"), std::string::npos) << err;
  const std::string unknown = WriteToml("store = \"/s\"\nmax-bach = 3\n");
  EXPECT_EQ(Parse({"--config", unknown}, &c, &err), 2);
  EXPECT_NE(err.find("unknown key 'max-bach'"), std::string::npos) << err;
  EXPECT_NE(err.find(unknown), std::string::npos) << err;
  const std::string broken = WriteToml("store = \n");
  EXPECT_EQ(Parse({"--config", broken}, &c, &err), 2);
  EXPECT_NE(err.find(broken), std::string::npos) << err;
}

// The featurizer's device is its own flag: the scan's --device keeps its
// meaning, and either may be set without the other.
TEST(ConfigTest, FeaturizeDeviceIsSeparateFromTheScanDevice) {
  ServerConfig c;
  EXPECT_FALSE(Parse({"--store", "/s"}, &c).has_value());
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.featurize_device, "auto");
  ServerConfig d;
  EXPECT_FALSE(
      Parse({"--store", "/s", "--device", "cuda", "--featurize-device", "cpu"},
            &d)
          .has_value());
  EXPECT_EQ(d.device, "cuda");
  EXPECT_EQ(d.featurize_device, "cpu");
  const std::string path =
      WriteToml("store = \"/s\"\nfeaturize-device = \"cuda\"\n");
  ServerConfig e;
  EXPECT_FALSE(Parse({"--config", path}, &e).has_value());
  EXPECT_EQ(e.featurize_device, "cuda");
  EXPECT_EQ(e.device, "auto");
  std::string err;
  ServerConfig f;
  EXPECT_EQ(Parse({"--store", "/s", "--featurize-device", "gpu"}, &f, &err), 2);
  EXPECT_NE(err.find("gpu"), std::string::npos) << err;
}

TEST(ConfigTest, HelpExplainsEveryOption) {
  ServerConfig c;
  std::string out;
  EXPECT_EQ(Parse({"--help"}, &c, nullptr, &out), 0);
  for (const char* flag : {"--config",
                           "--store",
                           "--model",
                           "--run",
                           "--listen",
                           "--metrics-port",
                           "--device",
                           "--featurize-device",
                           "--workers",
                           "--threads",
                           "--max-batch",
                           "--max-queue-delay-us",
                           "--max-queue",
                           "--max-concurrent",
                           "--max-message-bytes",
                           "--tls-cert",
                           "--tls-key",
                           "--tls-client-ca",
                           "--token-file",
                           "--drain-timeout-s",
                           "--port-file",
                           "--fashion-mnist-dir",
                           "--mnist-dir",
                           "--no-thumbnails"}) {
    EXPECT_NE(out.find(flag), std::string::npos) << flag;
  }
}

}  // namespace
}  // namespace retrace::retraced

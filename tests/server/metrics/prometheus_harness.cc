#include "tests/server/metrics/prometheus_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace retrace::testing {
namespace {

constexpr char kLogName[] = "prometheus.log";
constexpr int kStartAttempts = 3;
constexpr absl::Duration kPollInterval = absl::Milliseconds(100);
constexpr absl::Duration kQueryInterval = absl::Milliseconds(200);
constexpr absl::Duration kStopTimeout = absl::Seconds(10);

std::string ErrnoText(absl::string_view what) {
  return absl::StrCat(what, ": ", std::strerror(errno));
}

// Closes a file descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) close(fd_);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

absl::Status SetSocketTimeout(int fd, absl::Duration timeout) {
  const timeval tv = absl::ToTimeval(timeout);
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    return absl::InternalError(ErrnoText("setsockopt"));
  }
  return absl::OkStatus();
}

// A connected TCP socket to host:port (the first address that accepts); on
// Linux SO_SNDTIMEO also bounds connect().
absl::StatusOr<int> Connect(const std::string& host, int port,
                            absl::Duration timeout) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  const int gai = getaddrinfo(host.c_str(), std::to_string(port).c_str(),
                              &hints, &addresses);
  if (gai != 0) {
    return absl::UnavailableError(
        absl::StrCat("resolve ", host, ": ", gai_strerror(gai)));
  }
  std::string last_error = "no address";
  int connected = -1;
  for (addrinfo* a = addresses; a != nullptr && connected < 0; a = a->ai_next) {
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = ErrnoText("socket");
      continue;
    }
    if (!SetSocketTimeout(fd, timeout).ok() ||
        connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      last_error = ErrnoText("connect");
      close(fd);
      continue;
    }
    connected = fd;
  }
  freeaddrinfo(addresses);
  if (connected < 0) {
    return absl::UnavailableError(
        absl::StrCat("connect to ", host, ":", port, ": ", last_error));
  }
  return connected;
}

absl::Status SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(ErrnoText("send"));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReceiveAll(int fd) {
  std::string received;
  char buffer[16384];
  while (true) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n == 0) return received;
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(ErrnoText("recv"));
    }
    received.append(buffer, static_cast<size_t>(n));
  }
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

absl::Status WriteWholeFile(const std::string& path, absl::string_view text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::string PrometheusConfig(const std::vector<std::string>& targets,
                             absl::Duration scrape_interval) {
  const std::string interval =
      absl::StrCat(absl::ToInt64Milliseconds(scrape_interval), "ms");
  std::vector<std::string> quoted;
  for (const std::string& target : targets) {
    quoted.push_back(absl::StrCat("\"", target, "\""));
  }
  return absl::StrCat(
      "global:\n"
      "  scrape_interval: ",
      interval, "\n", "  scrape_timeout: ", interval, "\n",
      "  evaluation_interval: ", interval, "\n",
      "scrape_configs:\n"
      "  - job_name: retraced\n"
      "    static_configs:\n"
      "      - targets: [",
      absl::StrJoin(quoted, ", "), "]\n");
}

absl::StatusOr<std::string> MakeWorkDir() {
  std::string pattern = ::testing::TempDir();
  if (!pattern.empty() && pattern.back() != '/') pattern += '/';
  pattern += "retrace_prometheus_XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(ErrnoText(absl::StrCat("mkdtemp ", pattern)));
  }
  return pattern;
}

}  // namespace

bool PrometheusAvailable() { return access(kPrometheusBinary, X_OK) == 0; }

absl::StatusOr<int> PickFreePort() {
  ScopedFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return absl::InternalError(ErrnoText("socket"));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&address), length) != 0 ||
      getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length) !=
          0) {
    return absl::InternalError(ErrnoText("bind 127.0.0.1:0"));
  }
  return static_cast<int>(ntohs(address.sin_port));
}

absl::StatusOr<std::string> HttpGet(const std::string& host, int port,
                                    const std::string& path,
                                    absl::Duration timeout) {
  const std::string url = absl::StrCat("http://", host, ":", port, path);
  absl::StatusOr<int> connected = Connect(host, port, timeout);
  if (!connected.ok()) {
    return absl::UnavailableError(
        absl::StrCat("GET ", url, ": ", connected.status().message()));
  }
  ScopedFd fd(*connected);
  // HTTP/1.0 so that the server neither keeps the connection open nor
  // chunks the body: the response ends where the stream does.
  absl::Status sent =
      SendAll(fd.get(), absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host,
                                     ":", port, "\r\nAccept: */*\r\n\r\n"));
  absl::StatusOr<std::string> response =
      sent.ok() ? ReceiveAll(fd.get()) : absl::StatusOr<std::string>(sent);
  if (!response.ok()) {
    return absl::UnavailableError(
        absl::StrCat("GET ", url, ": ", response.status().message()));
  }
  const size_t header_end = response->find("\r\n\r\n");
  if (header_end == std::string::npos) {
    return absl::UnavailableError(absl::StrCat(
        "GET ", url, ": incomplete response (", response->size(), " bytes)"));
  }
  const absl::string_view head(response->data(), header_end);
  const absl::string_view status_line = head.substr(0, head.find("\r\n"));
  std::string body = response->substr(header_end + 4);
  // "HTTP/1.1 200 OK": the code is the second word.
  const size_t space = status_line.find(' ');
  if (space == absl::string_view::npos ||
      !absl::StartsWith(status_line.substr(space + 1), "200")) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": ", status_line,
                                               ": ", body.substr(0, 1000)));
  }
  return body;
}

std::string UrlEncode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string encoded;
  for (unsigned char c : text) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '.' || c == '_' ||
        c == '~') {
      encoded += static_cast<char>(c);
    } else {
      encoded += '%';
      encoded += kHex[c >> 4];
      encoded += kHex[c & 15];
    }
  }
  return encoded;
}

absl::StatusOr<std::unique_ptr<PrometheusProcess>> PrometheusProcess::Start(
    const std::vector<std::string>& targets, const PrometheusOptions& options) {
  if (options.scrape_interval < absl::Milliseconds(1)) {
    return absl::InvalidArgumentError("scrape interval under 1 ms");
  }
  absl::Status last_error;
  for (int attempt = 0; attempt < kStartAttempts; ++attempt) {
    absl::StatusOr<std::string> work_dir = MakeWorkDir();
    if (!work_dir.ok()) return work_dir.status();
    const std::string config_path = *work_dir + "/prometheus.yml";
    absl::Status written = WriteWholeFile(
        config_path, PrometheusConfig(targets, options.scrape_interval));
    absl::StatusOr<int> port = PickFreePort();
    if (!written.ok() || !port.ok()) {
      std::error_code ignored;
      std::filesystem::remove_all(*work_dir, ignored);
      return written.ok() ? port.status() : written;
    }

    // Everything the child needs is prepared here: between fork and exec
    // only async-signal-safe calls are allowed (other threads may hold
    // allocator locks).
    std::vector<std::string> args = {
        options.binary,
        "--config.file=" + config_path,
        "--storage.tsdb.path=" + *work_dir + "/data",
        absl::StrCat("--web.listen-address=127.0.0.1:", *port),
    };
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    const std::string log_path = *work_dir + "/" + kLogName;
    const int log_fd =
        open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      absl::Status error =
          absl::InternalError(ErrnoText(absl::StrCat("open ", log_path)));
      std::error_code ignored;
      std::filesystem::remove_all(*work_dir, ignored);
      return error;
    }
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid == 0) {
      // Dies with the starting thread, so a killed test leaves no server.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      if (dup2(log_fd, STDOUT_FILENO) < 0 || dup2(log_fd, STDERR_FILENO) < 0 ||
          chdir(work_dir->c_str()) != 0) {
        _exit(127);
      }
      execv(argv[0], argv.data());
      _exit(127);
    }
    if (pid < 0) {
      absl::Status error = absl::InternalError(ErrnoText("fork"));
      close(log_fd);
      std::error_code ignored;
      std::filesystem::remove_all(*work_dir, ignored);
      return error;
    }
    close(log_fd);

    // From here on the destructor stops the child and removes the directory.
    std::unique_ptr<PrometheusProcess> process(
        new PrometheusProcess(*work_dir, pid, *port));
    const absl::Time deadline = absl::Now() + options.start_timeout;
    absl::Status ready = absl::UnavailableError("not polled yet");
    bool exited = false;
    while (absl::Now() < deadline) {
      int wait_status = 0;
      if (waitpid(pid, &wait_status, WNOHANG) == pid) {
        process->pid_ = -1;
        exited = true;
        ready = absl::UnavailableError(
            absl::StrCat(options.binary, " exited (status ", wait_status,
                         ") before it was ready"));
        break;
      }
      ready =
          HttpGet("127.0.0.1", *port, "/-/ready", absl::Seconds(1)).status();
      if (ready.ok()) return process;
      absl::SleepFor(kPollInterval);
    }
    const std::string log = process->LogTail();
    last_error = absl::Status(exited ? absl::StatusCode::kUnavailable
                                     : absl::StatusCode::kDeadlineExceeded,
                              absl::StrCat("prometheus on 127.0.0.1:", *port,
                                           " not ready: ", ready.message(),
                                           "\n--- its log ---\n", log));
    // Only a port taken between PickFreePort and the bind is worth retrying.
    if (!exited || !absl::StrContains(log, "address already in use")) break;
  }
  return last_error;
}

PrometheusProcess::~PrometheusProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    const absl::Time deadline = absl::Now() + kStopTimeout;
    bool reaped = false;
    while (!reaped && absl::Now() < deadline) {
      int wait_status = 0;
      reaped = waitpid(pid_, &wait_status, WNOHANG) == pid_;
      if (!reaped) absl::SleepFor(kPollInterval);
    }
    if (!reaped) {
      kill(pid_, SIGKILL);
      int wait_status = 0;
      waitpid(pid_, &wait_status, 0);
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(work_dir_, ignored);
}

std::string PrometheusProcess::LogTail(size_t max_bytes) const {
  const std::string log = ReadWholeFile(work_dir_ + "/" + kLogName);
  return log.size() <= max_bytes ? log : log.substr(log.size() - max_bytes);
}

absl::StatusOr<double> QueryPrometheusScalar(int port,
                                             const std::string& promql) {
  absl::StatusOr<std::string> body =
      HttpGet("127.0.0.1", port, "/api/v1/query?query=" + UrlEncode(promql));
  if (!body.ok()) return body.status();
  const nlohmann::json reply =
      nlohmann::json::parse(*body, /*cb=*/nullptr, /*allow_exceptions=*/false);
  const std::string context = absl::StrCat("query ", promql, ": ");
  if (reply.is_discarded() || !reply.is_object()) {
    return absl::InternalError(
        absl::StrCat(context, "reply is not a JSON object: ", *body));
  }
  if (reply.value("status", "") != "success") {
    return absl::UnavailableError(absl::StrCat(context, *body));
  }
  try {
    const nlohmann::json& data = reply.at("data");
    const std::string type = data.at("resultType").get<std::string>();
    const nlohmann::json* sample_value = nullptr;
    if (type == "scalar") {
      sample_value = &data.at("result");
    } else if (type == "vector") {
      const nlohmann::json& result = data.at("result");
      if (result.empty()) {
        return absl::NotFoundError(absl::StrCat(context, "no series"));
      }
      if (result.size() > 1) {
        return absl::FailedPreconditionError(
            absl::StrCat(context, result.size(),
                         " series; aggregate them (sum, max): ", *body));
      }
      sample_value = &result.at(0).at("value");
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(context, "result type ", type, " is not a scalar"));
    }
    // [<unix time>, "<value>"]: Prometheus sends the number as a string.
    const std::string text = sample_value->at(1).get<std::string>();
    double value = 0;
    if (!absl::SimpleAtod(text, &value)) {
      return absl::InternalError(absl::StrCat(context, "bad value ", text));
    }
    return value;
  } catch (const nlohmann::json::exception& e) {
    return absl::InternalError(
        absl::StrCat(context, "unexpected reply (", e.what(), "): ", *body));
  }
}

absl::StatusOr<double> WaitForPrometheusScalar(
    int port, const std::string& promql,
    const std::function<bool(double)>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string last = "no answer";
  while (true) {
    absl::StatusOr<double> value = QueryPrometheusScalar(port, promql);
    if (value.ok() && done(*value)) return value;
    last = value.ok() ? absl::StrCat("value ", *value)
                      : std::string(value.status().message());
    if (absl::Now() >= deadline) break;
    absl::SleepFor(kQueryInterval);
  }
  return absl::DeadlineExceededError(
      absl::StrCat("query ", promql, " not satisfied after ",
                   absl::FormatDuration(timeout), "; last: ", last));
}

absl::StatusOr<double> WaitForPrometheusScalar(int port,
                                               const std::string& promql,
                                               double want,
                                               absl::Duration timeout) {
  return WaitForPrometheusScalar(
      port, promql, [want](double value) { return value == want; }, timeout);
}

}  // namespace retrace::testing

// retraced: parses the configuration, builds the serving stack
// (server/stack/server_stack.h: metrics, gRPC server NOT_SERVING, store,
// scorer, featurizer, batcher, engine), starts serving, then waits for
// SIGTERM or SIGINT and drains. docs/operations.md describes the flags and
// the lifecycle.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/allocator.h"
#include "common/logging.h"
#include "server/retraced/config.h"
#include "server/stack/server_stack.h"

namespace retrace::retraced {
namespace {

// The write end of the signal pipe: the one global, because a signal
// handler can reach nothing else.
int g_signal_pipe = -1;

int Run(const ServerConfig& config) {
  // SIGTERM and SIGINT only write to a pipe (whichever thread takes them);
  // the main thread reads it once serving.
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    std::cerr << "retraced: pipe: " << std::strerror(errno) << "\n";
    return 1;
  }
  g_signal_pipe = pipe_fds[1];
  struct sigaction action {};
  action.sa_handler = [](int signal) {
    const char byte = static_cast<char>(signal);
    [[maybe_unused]] ssize_t n = write(g_signal_pipe, &byte, 1);
  };
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  absl::StatusOr<std::unique_ptr<stack::ServerStack>> server =
      stack::ServerStack::Create(config);
  if (!server.ok()) {
    std::cerr << "retraced: " << server.status() << "\n";
    return 1;
  }
  (*server)->Start();

  char signal = 0;
  while (read(pipe_fds[0], &signal, 1) < 0 && errno == EINTR) {
  }
  RETRACE_LOG(INFO) << "signal " << int{signal} << ": draining (up to "
                    << config.drain_timeout_s << " s)";
  (*server)->Shutdown(absl::Seconds(config.drain_timeout_s));
  RETRACE_LOG(INFO) << "stopped";
  return 0;
}

}  // namespace
}  // namespace retrace::retraced

int main(int argc, char** argv) {
  retrace::KeepFreedMemoryForReuse();
  retrace::retraced::ServerConfig config;
  if (std::optional<int> exit = retrace::retraced::ParseServerConfig(
          argc, argv, &config, std::cout, std::cerr)) {
    return *exit;
  }
  return retrace::retraced::Run(config);
}

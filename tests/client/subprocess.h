// Runs a program as a child process and captures what it prints, for tests
// that exercise a binary the way a user does.
#ifndef RETRACE_TESTS_CLIENT_SUBPROCESS_H_
#define RETRACE_TESTS_CLIENT_SUBPROCESS_H_

#include <string>
#include <vector>

namespace retrace::client::testing {

struct ProcessResult {
  int exit_code = -1;  // 128 + signal number when killed by a signal
  std::string out;     // everything written to stdout
  std::string err;     // everything written to stderr
  double seconds = 0;  // wall time from start to exit
};

// Runs argv[0] (a path) with `argv` and the environment of this process minus
// every RETRACE_* variable, plus `env` ("NAME=value" entries). stdin is
// /dev/null. The child is killed (SIGKILL) after `timeout_seconds`.
ProcessResult RunProcess(const std::vector<std::string>& argv,
                         const std::vector<std::string>& env = {},
                         double timeout_seconds = 60);

}  // namespace retrace::client::testing

#endif  // RETRACE_TESTS_CLIENT_SUBPROCESS_H_

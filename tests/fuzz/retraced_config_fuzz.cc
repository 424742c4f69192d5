// retraced.toml: any file given to `retraced --config` either configures the
// server or stops it with exit status 2 and a message naming the file, never
// a crash, an exception or an unexplained exit.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "server/retraced/config.h"
#include "tests/fuzz/require.h"

namespace {

using retrace::fuzz::Require;

std::string* g_path = nullptr;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (g_path == nullptr) {
    g_path = new std::string(
        (std::filesystem::temp_directory_path() /
         ("retrace_config_fuzz_" + std::to_string(getpid()) + ".toml"))
            .string());
  }
  {
    std::ofstream file(*g_path, std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(data),
               static_cast<std::streamsize>(size));
    Require(file.good());
  }
  const std::string flag = "--config=" + *g_path;
  const char* argv[] = {"retraced", "--store", "/nonexistent/store",
                        flag.c_str()};
  retrace::retraced::ServerConfig config;
  std::ostringstream out, err;
  const std::optional<int> code =
      retrace::retraced::ParseServerConfig(4, argv, &config, out, err);
  if (code.has_value()) {
    Require(*code == 2 || *code == 0);
    if (*code == 2) Require(!err.str().empty());
  }
  return 0;
}

// retraced's configuration: command-line flags (CLI11) and an optional TOML
// file (toml++) given with --config. The file's keys are the long flag names
// without the dashes' prefix ("max-batch = 16", "store = \"/srv/store\"");
// flags given on the command line override the file.
#ifndef RETRACE_SERVER_RETRACED_CONFIG_H_
#define RETRACE_SERVER_RETRACED_CONFIG_H_

#include <optional>
#include <ostream>

#include "server/stack/server_config.h"

namespace retrace::retraced {

// The struct lives with the stack it configures; retraced parses it.
using stack::ServerConfig;

// Parses argv (and the --config file). Returns the exit code when the
// process should stop: 0 after --help, 2 for a usage error (the message,
// naming the flag or the file and key, goes to `err`); nullopt to go on.
std::optional<int> ParseServerConfig(int argc, const char* const* argv,
                                     ServerConfig* config, std::ostream& out,
                                     std::ostream& err);

}  // namespace retrace::retraced

#endif  // RETRACE_SERVER_RETRACED_CONFIG_H_

// How retrace subcommands plug into main: the connection flags shared by all
// of them live on the top-level CLI11 app; each *_command.cc registers its own
// flags and returns the function that runs it once the command line has been
// parsed.
#ifndef RETRACE_CLIENT_COMMAND_H_
#define RETRACE_CLIENT_COMMAND_H_

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/client.h"

namespace retrace::client {

// Process exit codes of retrace (docs/cli.md).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // a local step after the call failed
inline constexpr int kExitUsage = 2;    // bad command line, files or values
inline constexpr int kExitServer = 3;   // the call failed (a gRPC status)

// Connection flags, filled by CLI11 (and RETRACE_* environment variables).
struct ConnectionFlags {
  std::string server = "localhost:50051";
  bool tls = false;
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  std::string tls_server_name;
  std::string token;
  std::string token_file;
  double timeout_seconds = 120;
};

// Registers --server, --tls, --ca, --cert, --key, --tls-server-name, --token,
// --token-file and --timeout on the top-level app.
void AddConnectionFlags(CLI::App& app, ConnectionFlags* flags);

// The options for Client::Create: the bearer token comes from --token,
// --token-file, $RETRACE_TOKEN or $RETRACE_TOKEN_FILE, first found wins
// (both flags at once is an error). Errors are usage errors.
absl::StatusOr<ConnectionOptions> MakeConnectionOptions(
    const ConnectionFlags& flags);

// Connects (lazily) with `flags`; on error prints it and sets *exit_code to
// kExitUsage.
std::unique_ptr<Client> ConnectOrReport(absl::string_view command,
                                        const ConnectionFlags& flags,
                                        int* exit_code);

// Prints "retrace <command>: <message>" and the --help hint on stderr;
// returns kExitUsage.
int ReportUsage(absl::string_view command, absl::string_view message);
// Prints "retrace <command>: [<what>: ]CODE: message" on stderr (the gRPC
// code name and the server's text); returns kExitServer.
int ReportServerError(absl::string_view command, absl::string_view what,
                      const absl::Status& status);

struct Subcommand {
  CLI::App* app = nullptr;  // owned by the parent app
  // Runs the command with the parsed flags; returns the exit code after
  // printing any error on stderr.
  std::function<int()> run;
};

// Each registers `retrace <name>` on `parent`; `connection` (owned by main)
// holds the shared flags once parsed.
Subcommand RegisterQueryCommand(CLI::App& parent,
                                const ConnectionFlags* connection);
Subcommand RegisterSelfInfluenceCommand(CLI::App& parent,
                                        const ConnectionFlags* connection);
Subcommand RegisterInfoCommand(CLI::App& parent,
                               const ConnectionFlags* connection);
Subcommand RegisterHealthCommand(CLI::App& parent,
                                 const ConnectionFlags* connection);

}  // namespace retrace::client

#endif  // RETRACE_CLIENT_COMMAND_H_

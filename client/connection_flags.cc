// The connection flags shared by every retrace subcommand and the error
// reporting that all of them use.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "client/command.h"

namespace retrace::client {
namespace {

std::string GetEnv(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

}  // namespace

void AddConnectionFlags(CLI::App& app, ConnectionFlags* flags) {
  app.add_option("--server", flags->server, "retraced address, HOST:PORT")
      ->envname("RETRACE_SERVER")
      ->capture_default_str();
  app.add_flag("--tls", flags->tls,
               "Use TLS with the system's root certificates (implied by --ca "
               "and --cert)")
      ->envname("RETRACE_TLS");
  app.add_option("--ca", flags->ca_file,
                 "PEM file of the CA that signed the server's certificate")
      ->envname("RETRACE_CA");
  app.add_option("--cert", flags->cert_file,
                 "PEM client certificate for mutual TLS (with --key)")
      ->envname("RETRACE_CERT");
  app.add_option("--key", flags->key_file, "PEM private key of --cert")
      ->envname("RETRACE_KEY");
  app.add_option("--tls-server-name", flags->tls_server_name,
                 "Name to verify the server's certificate against instead of "
                 "the host of --server");
  app.add_option("--token", flags->token,
                 "Bearer token (else $RETRACE_TOKEN); visible in the process "
                 "list, prefer --token-file");
  app.add_option("--token-file", flags->token_file,
                 "File whose first non-comment line is the bearer token (else "
                 "$RETRACE_TOKEN_FILE)");
  app.add_option("--timeout", flags->timeout_seconds,
                 "Deadline of each call in seconds; 0: none")
      ->envname("RETRACE_TIMEOUT")
      ->capture_default_str();
}

absl::StatusOr<ConnectionOptions> MakeConnectionOptions(
    const ConnectionFlags& flags) {
  ConnectionOptions options;
  options.server = flags.server;
  options.tls = flags.tls;
  options.ca_file = flags.ca_file;
  options.cert_file = flags.cert_file;
  options.key_file = flags.key_file;
  options.tls_server_name = flags.tls_server_name;
  if (!std::isfinite(flags.timeout_seconds) || flags.timeout_seconds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout must be a number of seconds >= 0, got ",
                     flags.timeout_seconds));
  }
  options.timeout = absl::Seconds(flags.timeout_seconds);
  if (!flags.token.empty() && !flags.token_file.empty()) {
    return absl::InvalidArgumentError(
        "--token and --token-file exclude each other");
  }
  if (!flags.token.empty()) {
    options.token = flags.token;
  } else if (!flags.token_file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(flags.token_file);
    if (!token.ok()) return token.status();
    options.token = *std::move(token);
  } else if (std::string token = GetEnv("RETRACE_TOKEN"); !token.empty()) {
    options.token = std::move(token);
  } else if (std::string file = GetEnv("RETRACE_TOKEN_FILE"); !file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(file);
    if (!token.ok()) return token.status();
    options.token = *std::move(token);
  }
  return options;
}

std::unique_ptr<Client> ConnectOrReport(absl::string_view command,
                                        const ConnectionFlags& flags,
                                        int* exit_code) {
  absl::StatusOr<ConnectionOptions> options = MakeConnectionOptions(flags);
  if (!options.ok()) {
    *exit_code = ReportUsage(command, options.status().message());
    return nullptr;
  }
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(*options);
  if (!client.ok()) {
    *exit_code = ReportUsage(command, client.status().message());
    return nullptr;
  }
  return *std::move(client);
}

int ReportUsage(absl::string_view command, absl::string_view message) {
  std::fprintf(stderr,
               "retrace %.*s: %.*s\nRun with --help for more information.\n",
               static_cast<int>(command.size()), command.data(),
               static_cast<int>(message.size()), message.data());
  return kExitUsage;
}

int ReportServerError(absl::string_view command, absl::string_view what,
                      const absl::Status& status) {
  const std::string prefix = what.empty() ? "" : absl::StrCat(what, ": ");
  std::fprintf(stderr, "retrace %.*s: %s%s: %.*s\n",
               static_cast<int>(command.size()), command.data(), prefix.c_str(),
               absl::StatusCodeToString(status.code()).c_str(),
               static_cast<int>(status.message().size()),
               status.message().data());
  return kExitServer;
}

}  // namespace retrace::client

// retrace: the command-line client of retraced. main only wires the command
// line to the subcommands; each registers itself from its own *_command.cc.
#include <CLI/CLI.hpp>
#include <vector>

#include "client/command.h"

int main(int argc, char** argv) {
  using namespace retrace::client;
  CLI::App app{
      "retrace: ask a retraced server which training images made a diffusion "
      "model produce an image (Diffusion-TracIn and Diffusion-ReTrac)"};
  app.require_subcommand(1);
  ConnectionFlags connection;
  AddConnectionFlags(app, &connection);
  std::vector<Subcommand> subcommands = {
      RegisterQueryCommand(app, &connection),
      RegisterSelfInfluenceCommand(app, &connection),
      RegisterInfoCommand(app, &connection),
      RegisterHealthCommand(app, &connection)};
  for (Subcommand& command : subcommands) {
    // The connection flags may also follow the subcommand's own.
    command.app->fallthrough();
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help comes through here with exit code 0.
    const int code = app.exit(e);
    return code == 0 ? kExitOk : kExitUsage;
  }
  for (Subcommand& command : subcommands) {
    if (command.app->parsed()) return command.run();
  }
  return kExitUsage;
}

// retrace-batch: offline jobs (training, the store build, the evaluation).
// main only wires the command line to the subcommands in retrace_jobs and
// retrace_eval.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <vector>

#include "common/allocator.h"
#include "jobs/command.h"

int main(int argc, char** argv) {
  retrace::KeepFreedMemoryForReuse();
  using namespace retrace::jobs;
  CLI::App app{
      "retrace-batch: offline jobs of retrace (train a diffusion "
      "model with a replay log, build attribution stores, evaluate them)"};
  app.require_subcommand(1);
  std::vector<Subcommand> subcommands = {
      RegisterTrainCommand(app), RegisterBuildStoreCommand(app),
      RegisterJoinStoreCommand(app), RegisterHeldOutCommand(app),
      RegisterEvalCommand(app, argc, argv)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version come through here with exit code 0.
    const int code = app.exit(e);
    return code == 0 ? kExitOk : kExitUsage;
  }
  for (Subcommand& command : subcommands) {
    if (command.app->parsed()) return command.run();
  }
  return kExitUsage;
}

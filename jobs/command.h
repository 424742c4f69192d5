// How retrace-batch subcommands plug into main: each *_command.cc registers
// its flags on the top-level CLI11 app and returns the function that runs it
// once the command line has been parsed.
#ifndef RETRACE_JOBS_COMMAND_H_
#define RETRACE_JOBS_COMMAND_H_

#include <CLI/CLI.hpp>
#include <functional>

namespace retrace::jobs {

// Process exit codes of retrace-batch.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // the job ran and failed
inline constexpr int kExitUsage = 2;    // bad command line or flag values

struct Subcommand {
  CLI::App* app = nullptr;  // owned by the parent app
  // Runs the command with the parsed flags; returns the exit code after
  // printing any error on stderr.
  std::function<int()> run;
};

// `retrace-batch train` (train_command.cc).
Subcommand RegisterTrainCommand(CLI::App& parent);
// `retrace-batch build-store` and `join-store` (build_store_command.cc).
Subcommand RegisterBuildStoreCommand(CLI::App& parent);
Subcommand RegisterJoinStoreCommand(CLI::App& parent);
// `retrace-batch held-out` (held_out_command.cc).
Subcommand RegisterHeldOutCommand(CLI::App& parent);

// `retrace-batch eval` (eval_command.cc); argv is recorded in the report.
Subcommand RegisterEvalCommand(CLI::App& parent, int argc, char** argv);

}  // namespace retrace::jobs

#endif  // RETRACE_JOBS_COMMAND_H_

// Why: the `keel` entry point. It only dispatches to a subcommand and turns any error into one clear line on
// stderr and a non-zero exit status. A DistributedError (a rank of the job is dead or hung) ends the process at
// once with std::_Exit: the c10d/Gloo/NCCL objects still alive, and static destructors, may wait on the missing
// rank, and the launcher (keel launch, torchrun, srun) is waiting for this exit to stop the other ranks.
// SIGPIPE is ignored: a rank whose launcher died (its stdout/stderr pipes have no reader any more) must keep
// training until the stop signal's checkpoint is saved; a write to a closed pipe then fails with EPIPE, which
// the console sinks and std::cout drop, while train.log and the run's files are written as before.
#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/parallel/communicator.h"
#include "keel/version.h"

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << keel::cli::usage();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version" || args[0] == "version") {
    std::cout << "keel " << KEEL_VERSION << "\n";
    return 0;
  }
  const std::string command = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (command == "train") return keel::cli::cmd_train(rest);
    if (command == "resume") return keel::cli::cmd_resume(rest);
    if (command == "plugins") return keel::cli::cmd_plugins(rest);
    if (command == "control") return keel::cli::cmd_control(rest);
    if (command == "data") return keel::cli::cmd_data(rest);
    if (command == "inspect") return keel::cli::cmd_inspect(rest);
    if (command == "config") return keel::cli::cmd_config(rest);
    if (command == "launch") return keel::cli::cmd_launch(rest);
    if (command == "export-hf") return keel::cli::cmd_export_hf(rest);
    if (command == "import-hf") return keel::cli::cmd_import_hf(rest);
    if (command == "score") return keel::cli::cmd_score(rest);
    if (command == "eval") return keel::cli::cmd_eval(rest);
    if (command == "report") return keel::cli::cmd_report(rest);
    if (command == "plan") return keel::cli::cmd_plan(rest);
    if (command == "verify") return keel::cli::cmd_verify(rest);
    if (command == "forensics") return keel::cli::cmd_forensics(rest);
    if (command == "tournament") return keel::cli::cmd_tournament(rest);
    std::cerr << "keel: unknown command '" << command << "'\n\n" << keel::cli::usage();
    return 2;
  } catch (const keel::parallel::DistributedError& e) {
    keel::cli::exit_on_distributed_error(command, e.what());
  } catch (const c10::Error& e) {  // TORCH_CHECK failures: the message without LibTorch's C++ backtrace
    std::cerr << "keel " << command << ": error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "keel " << command << ": error: " << e.what() << "\n";
    return 1;
  }
}

// Why: `keel launch --nproc N [--master-addr A] [--master-port P] [--grace-s S] -- CMD ARGS...` runs the N ranks
// of a job on this machine, the way torchrun does. This file only parses the flags (before the `--`) into
// parallel::LaunchOptions and reports usage errors; starting, supervising and stopping the ranks is
// core/parallel/launcher.h's job.
#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/parallel/launcher.h"

namespace keel::cli {
namespace {

const char* const kLaunchUsage =
    "usage: keel launch --nproc N [--master-addr ADDR] [--master-port PORT] [--grace-s S] -- CMD [ARGS...]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

parallel::LaunchOptions parse_launch_args(const Args& args, bool& help) {
  parallel::LaunchOptions o;
  const auto dashes = std::find(args.begin(), args.end(), "--");
  const Args own(args.begin(), dashes);
  po::options_description options("keel launch");
  options.add_options()("nproc", po::value<int>(&o.nproc), "number of ranks to start on this machine (>= 1)")(
      "master-addr", po::value<std::string>(&o.master_addr), "address of rank 0's store (default 127.0.0.1)")(
      "master-port", po::value<int>(&o.master_port), "port of rank 0's store (default: a free port)")(
      "grace-s", po::value<double>(&o.grace_s), "seconds between SIGTERM and SIGKILL when a rank fails (default 30)")(
      "help", "show this help");
  const bool wants_help = std::find(own.begin(), own.end(), "--help") != own.end();
  if (dashes == args.end() && !wants_help) throw UsageError("missing '--' before the command to run");
  po::variables_map vm;
  try {
    vm = parse_args(own, options, "launch");
  } catch (const std::exception& e) {
    const std::string what = e.what();
    const std::string own_prefix = "keel launch: ";
    throw UsageError(what.rfind(own_prefix, 0) == 0 ? what.substr(own_prefix.size()) : what);
  }
  if (vm.count("help")) {
    help = true;
    std::cout << kLaunchUsage << options;
    return o;
  }
  o.command.assign(dashes + 1, args.end());
  if (!vm.count("nproc")) throw UsageError("--nproc is required");
  const std::string error = parallel::launch_options_error(o);
  if (!error.empty()) throw UsageError(error);
  return o;
}

}  // namespace

int cmd_launch(const Args& args) {
  parallel::LaunchOptions options;
  bool help = false;
  try {
    options = parse_launch_args(args, help);
  } catch (const UsageError& e) {
    // One line, as every command's usage error; status 2, apart from the 1 (or any status) a failed rank gives.
    const std::string what = e.what(), see = " (see keel launch --help)";
    const bool has_see = what.size() >= see.size() && what.compare(what.size() - see.size(), see.size(), see) == 0;
    std::cerr << "keel launch: error: " << what << (has_see ? "" : see) << "\n";
    return 2;
  }
  if (help) return 0;
  return parallel::run_local_ranks(std::move(options));
}

}  // namespace keel::cli

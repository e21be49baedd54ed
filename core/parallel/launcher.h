// Why: the supervisor behind `keel launch`: it runs the N ranks of a job on this machine, the way torchrun does,
// so that a multi-rank run needs nothing but keel. The CLI (core/cli/commands/launch_command.cpp) only parses
// the flags into LaunchOptions and calls run_local_ranks(); everything about processes lives here:
//   - each child gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (what
//     core/parallel/rendezvous.h reads), stdin from /dev/null, and its own process group;
//   - every line a child writes comes out on the launcher's stdout/stderr as "[rank K] line", whole lines only;
//   - SIGINT/SIGTERM to the launcher are passed on to every rank (keel train then checkpoints and exits 0); the
//     children have their own process groups so that a terminal's Ctrl-C reaches them once, through here;
//   - a launcher that dies without passing anything on (SIGKILL, SIGHUP, a crash) makes the kernel send each rank
//     SIGTERM (PR_SET_PDEATHSIG), so that keel train still checkpoints and exits 0; keel ignores SIGPIPE, so the
//     pipes that lost their reader cost a rank only its console lines (rank 0 also logs to train.log);
//   - the first rank that fails (non-zero status or a signal) stops the job: the others get SIGTERM, then
//     SIGKILL after the grace period, and the launcher exits with that rank's status (128 + signal for a signal).
#pragma once

#include <string>
#include <vector>

namespace keel::parallel {

// Set to "1" in every rank's environment: the launcher prefixes each output line with "[rank K] ", so the ranks'
// own log lines need no rank tag (core/train/run_ranks.cpp reads it).
inline constexpr const char* kLauncherPrefixesOutputEnv = "KEEL_LAUNCH_PREFIXES_OUTPUT";

struct LaunchOptions {
  int nproc = 0;                          // ranks to start on this machine (>= 1)
  std::string master_addr = "127.0.0.1";  // address of rank 0's store
  int master_port = 0;                    // port of rank 0's store; 0: a free port of this machine
  double grace_s = 30.0;                  // seconds between SIGTERM and SIGKILL when a rank fails
  std::vector<std::string> command;       // what each rank runs: program (a name on PATH, a path, or "keel") + args
};

// The first problem with `options` as one line naming the flag ("--nproc must be >= 1, got 0"), or "" when
// there is none. The CLI reports it as a usage error; run_local_ranks() refuses such options the same way.
std::string launch_options_error(const LaunchOptions& options);

// Starts options.nproc ranks running options.command and supervises them until every rank has exited; returns
// the job's exit status (0, or the first failed rank's: its exit status, or 128 + signal). Must be called from
// the main thread (PR_SET_PDEATHSIG is tied to the thread that forks). Throws std::invalid_argument for bad
// options, std::runtime_error when the program is not found or a rank cannot be started (the ranks already
// started are killed first).
int run_local_ranks(LaunchOptions options);

}  // namespace keel::parallel

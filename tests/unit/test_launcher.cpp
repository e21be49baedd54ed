// Why: parallel::run_local_ranks (core/parallel/launcher.h) is the supervisor behind `keel launch`; the CLI only
// parses flags into LaunchOptions. These tests call it in-process, without the binary: bad options are refused
// before anything starts (the same one-line messages the CLI prints), each rank gets its rendezvous variables,
// and the job's status is the first failed rank's. tests/integration/test_launch.cpp drives the binary (signals,
// output prefixes, the grace period).
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/parallel/launcher.h"
#include "tests/unit/test_support.h"

namespace keel::parallel {
namespace {

LaunchOptions options(int nproc, std::vector<std::string> command) {
  LaunchOptions o;
  o.nproc = nproc;
  o.command = std::move(command);
  o.grace_s = 5.0;
  return o;
}

TEST(Launcher, OptionsErrorsNameTheFlag) {
  EXPECT_EQ(launch_options_error(options(2, {"true"})), "");
  EXPECT_EQ(launch_options_error(options(0, {"true"})), "--nproc must be >= 1, got 0");
  EXPECT_EQ(launch_options_error(options(2, {})), "no command after '--'");
  LaunchOptions port = options(2, {"true"});
  port.master_port = 70000;
  EXPECT_EQ(launch_options_error(port), "--master-port must be a TCP port (1-65535; 0: a free one), got 70000");
  LaunchOptions grace = options(2, {"true"});
  grace.grace_s = -1.0;
  EXPECT_EQ(launch_options_error(grace), "--grace-s must be >= 0");
  LaunchOptions addr = options(2, {"true"});
  addr.master_addr = "";
  EXPECT_EQ(launch_options_error(addr), "--master-addr must not be empty");
}

TEST(Launcher, BadOptionsAndUnknownProgramsStartNothing) {
  EXPECT_THROW(run_local_ranks(options(0, {"true"})), std::invalid_argument);
  EXPECT_EQ(keel::testing::error_of([] { run_local_ranks(options(2, {"keel-no-such-program-xyz"})); }),
            "cannot run 'keel-no-such-program-xyz': not found on PATH");
}

TEST(Launcher, EveryRankGetsItsRendezvousVariables) {
  const std::string dir = keel::testing::test_dir();
  LaunchOptions o = options(3, {"sh", "-c",
                                "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT "
                                "$KEEL_LAUNCH_PREFIXES_OUTPUT\" > " +
                                    dir + "/rank-$RANK"});
  o.master_port = 29533;
  ASSERT_EQ(run_local_ranks(o), 0);
  for (int rank = 0; rank < 3; ++rank) {
    std::ifstream in(dir + "/rank-" + std::to_string(rank));
    std::string line;
    std::getline(in, line);
    const std::string r = std::to_string(rank);
    EXPECT_EQ(line, r + " " + r + " 3 3 127.0.0.1 29533 1") << rank;
  }
}

TEST(Launcher, JobStatusIsTheFailedRanksAndTheOthersAreStopped) {
  // Rank 1 fails with 3; rank 0 would run for a minute but gets SIGTERM, so the call returns at once.
  const auto start = std::chrono::steady_clock::now();
  const int status = run_local_ranks(options(2, {"sh", "-c", "if [ $RANK = 1 ]; then exit 3; fi; sleep 60"}));
  EXPECT_EQ(status, 3);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  // A rank killed by a signal: 128 + the signal.
  EXPECT_EQ(run_local_ranks(options(1, {"sh", "-c", "kill -9 $$"})), 128 + 9);
  EXPECT_EQ(run_local_ranks(options(2, {"true"})), 0);
}

}  // namespace
}  // namespace keel::parallel

// Why: `keel launch` is how a user starts a multi-rank job on one machine; what they rely on is that every rank
// gets its variables, that output stays readable (prefixed whole lines), that one failed rank stops the whole
// job promptly with that rank named, and that Ctrl-C/SIGTERM reach every rank. The ranks here are shell
// one-liners, so the tests check the launcher alone, in seconds.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include "keel/version.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

using Clock = std::chrono::steady_clock;

// A `keel launch` running in the background, its stdout and stderr going to a file (a pipe could be held open
// by a rank's leftover children, which is not what these tests are about).
class Launcher {
 public:
  explicit Launcher(const std::string& arguments) : output_path_(fresh_dir("launch") + ".out") {
    pid_ = fork();
    if (pid_ == 0) {
      const std::string command =
          std::string("exec ") + KEEL_BINARY + " launch " + arguments + " >" + output_path_ + " 2>&1";
      execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
      _exit(127);
    }
  }
  ~Launcher() {
    if (pid_ > 0 && exit_code_ < 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    std::filesystem::remove(output_path_);
  }

  pid_t pid() const { return pid_; }

  std::string output() const {
    std::ifstream in(output_path_);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  // Waits until `text` appears `times` times in the output; false after `seconds`.
  bool wait_for_output(const std::string& text, int times, double seconds) const {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < deadline) {
      const std::string out = output();
      int found = 0;
      for (size_t at = out.find(text); at != std::string::npos; at = out.find(text, at + 1)) ++found;
      if (found >= times) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  // The launcher's exit status (128 + signal if it was killed), or -1 if it is still running after `seconds`.
  int wait(double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    while (exit_code_ < 0 && Clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return exit_code_;
  }

 private:
  std::string output_path_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
};

// Runs `keel launch ARGUMENTS` to the end (at most `seconds`); {exit status, output, seconds taken}.
struct LaunchResult {
  int exit_code = -1;
  std::string output;
  double seconds = 0.0;
};
LaunchResult launch(const std::string& arguments, double seconds = 60.0) {
  const auto start = Clock::now();
  Launcher launcher(arguments);
  LaunchResult r;
  r.exit_code = launcher.wait(seconds);
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  r.output = launcher.output();
  return r;
}

TEST(Launch, EveryRankGetsItsVariablesAndPrefixedOutput) {
  const LaunchResult r = launch(
      "--nproc 3 -- sh -c 'echo \"hello $RANK/$WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT\"'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::regex line(R"(\[rank (\d)\] hello (\d)/3 (\d) 3 127\.0\.0\.1:(\d+))");
  std::map<int, int> lines_per_rank;
  std::string port;
  std::istringstream in(r.output);
  for (std::string text; std::getline(in, text);) {
    std::smatch m;
    if (!std::regex_match(text, m, line)) continue;
    EXPECT_EQ(m[1], m[2]) << text;  // the prefix is the rank's RANK
    EXPECT_EQ(m[2], m[3]) << text;  // LOCAL_RANK == RANK on one machine
    if (port.empty()) port = m[4];
    EXPECT_EQ(m[4], port) << "every rank must get the same MASTER_PORT:\n" << r.output;
    ++lines_per_rank[std::stoi(m[1])];
  }
  EXPECT_EQ(lines_per_rank, (std::map<int, int>{{0, 1}, {1, 1}, {2, 1}})) << r.output;
  EXPECT_NE(port, "0");
}

TEST(Launch, OutputStaysInWholeLinesAndAPartialLastLineIsKept) {
  // Each rank writes 200 lines in small pieces to stdout and stderr; no line may come out mixed with another.
  const LaunchResult r = launch(
      "--nproc 2 -- sh -c 'i=0; while [ $i -lt 200 ]; do printf \"r$RANK-\"; printf \"line-$i\\n\"; "
      "printf \"e$RANK-line-$i\\n\" >&2; i=$((i+1)); done; printf \"tail-$RANK\"'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::istringstream in(r.output);
  int lines = 0;
  for (std::string text; std::getline(in, text);) {
    EXPECT_TRUE(std::regex_match(text, std::regex(R"(\[rank ([01])\] (r|e)\1-line-\d+|\[rank ([01])\] tail-\3)")))
        << "mixed or unprefixed line: '" << text << "'";
    ++lines;
  }
  EXPECT_EQ(lines, 2 * (2 * 200 + 1));
}

TEST(Launch, KeelResolvesToTheLauncherItself) {
  const LaunchResult r = launch("--nproc 2 -- keel --version");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("[rank 0] keel " KEEL_VERSION), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[rank 1] keel " KEEL_VERSION), std::string::npos) << r.output;
}

TEST(Launch, AFailedRankStopsTheOthersAndGivesItsStatus) {
  const LaunchResult r =
      launch("--nproc 3 --grace-s 2 -- sh -c 'if [ \"$RANK\" = 1 ]; then sleep 0.3; exit 3; fi; sleep 600'");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("keel launch: rank 1 exited with status 3; stopping the other ranks"), std::string::npos)
      << r.output;
  EXPECT_LT(r.seconds, 10.0) << r.output;  // SIGTERM ends the sleeping ranks at once
}

TEST(Launch, RanksIgnoringSigtermAreKilledAfterTheGracePeriod) {
  const LaunchResult r = launch(
      "--nproc 3 --grace-s 2 -- sh -c 'trap \"\" TERM; if [ \"$RANK\" = 1 ]; then sleep 0.3; exit 3; fi; sleep 600'");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("rank 1 exited with status 3; stopping the other ranks"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 0 did not stop within --grace-s 2 s; sending SIGKILL"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 2 did not stop within --grace-s 2 s; sending SIGKILL"), std::string::npos) << r.output;
  EXPECT_GE(r.seconds, 2.0) << r.output;
  EXPECT_LT(r.seconds, 12.0) << r.output;
}

TEST(Launch, ARankKilledByASignalIsReportedAs128PlusTheSignal) {
  const LaunchResult r =
      launch("--nproc 2 --grace-s 2 -- sh -c 'if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 600'");
  EXPECT_EQ(r.exit_code, 128 + 9) << r.output;
  EXPECT_NE(r.output.find("keel launch: rank 0 was killed by signal 9"), std::string::npos) << r.output;
  EXPECT_LT(r.seconds, 10.0) << r.output;
}

TEST(Launch, SigtermToTheLauncherReachesEveryRank) {
  Launcher launcher("--nproc 3 -- sh -c 'trap \"echo got-term; exit 0\" TERM; echo ready; sleep 600 & wait'");
  ASSERT_TRUE(launcher.wait_for_output("ready", 3, 30.0)) << launcher.output();
  ASSERT_EQ(kill(launcher.pid(), SIGTERM), 0);
  const int exit_code = launcher.wait(20.0);
  const std::string out = launcher.output();
  EXPECT_EQ(exit_code, 0) << out;
  for (int rank = 0; rank < 3; ++rank)
    EXPECT_NE(out.find("[rank " + std::to_string(rank) + "] got-term"), std::string::npos) << out;
  EXPECT_NE(out.find("keel launch: got SIGTERM; passing it on to the 3 running ranks"), std::string::npos) << out;
}

TEST(Launch, SigintIsPassedOnAsSigint) {
  Launcher launcher("--nproc 2 -- sh -c 'trap \"echo got-int; exit 0\" INT; echo ready; sleep 600 & wait'");
  ASSERT_TRUE(launcher.wait_for_output("ready", 2, 30.0)) << launcher.output();
  ASSERT_EQ(kill(launcher.pid(), SIGINT), 0);
  EXPECT_EQ(launcher.wait(20.0), 0) << launcher.output();
  EXPECT_NE(launcher.output().find("[rank 1] got-int"), std::string::npos) << launcher.output();
}

TEST(Launch, BadUsageExitsWithStatusTwo) {
  const std::map<std::string, std::string> cases = {
      {"--nproc 2 sh -c true", "missing '--'"},
      {"--nproc 0 -- true", "--nproc must be >= 1"},
      {"-- true", "--nproc is required"},
      {"--nproc 2 --", "no command after '--'"},
      {"--nproc two -- true", "nproc"},
      {"--nproc 2 --master-port 70000 -- true", "--master-port must be a TCP port"},
      {"--nproc 2 --grace-s=-1 -- true", "--grace-s must be >= 0"},
      {"--nproc 2 --bogus -- true", "bogus"},
  };
  for (const auto& [arguments, message] : cases) {
    const LaunchResult r = launch(arguments, 30.0);
    EXPECT_EQ(r.exit_code, 2) << arguments << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("keel launch: error:", 0), 0u) << arguments << "\n" << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << arguments << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << arguments << "\n" << r.output;
    EXPECT_EQ(r.output.find("[rank"), std::string::npos) << "nothing may start: " << arguments << "\n" << r.output;
  }
}

// The pid of the rank `rank` that `launcher` started (-1 if none): its child whose environment has RANK=rank.
pid_t rank_pid(pid_t launcher, int rank) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat_file(entry.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    const size_t comm_end = stat.rfind(')');
    if (comm_end == std::string::npos) continue;
    std::istringstream fields(stat.substr(comm_end + 1));
    std::string state;
    pid_t parent = 0;
    fields >> state >> parent;
    if (parent != launcher) continue;
    std::ifstream environ_file(entry.path() / "environ");
    const std::string wanted = "RANK=" + std::to_string(rank);
    for (std::string var; std::getline(environ_file, var, '\0');)
      if (var == wanted) return static_cast<pid_t>(std::stoi(name));
  }
  return -1;
}

// `keel launch` of two `keel train` ranks (dp=2) on the tiny config.
std::string two_rank_training(const std::string& run_dir, int timeout_s) {
  return "--nproc 2 --grace-s 20 -- keel train --config " + tiny_config() + " " + test_data_override() +
         " --set parallel.dp=2 --set train.steps=100000 --set parallel.timeout_s=" + std::to_string(timeout_s) +
         " --run-dir " + run_dir;
}

TEST(Launch, AHungRankIsNamedByTheOthersAndTheJobStops) {
  const std::string run_dir = fresh_dir("launch-hung");
  Launcher launcher(two_rank_training(run_dir, 6));
  ASSERT_TRUE(launcher.wait_for_output("] batch:", 2, 120.0)) << launcher.output();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // both ranks are training
  const pid_t rank1 = rank_pid(launcher.pid(), 1);
  ASSERT_GT(rank1, 0) << launcher.output();
  ASSERT_EQ(kill(rank1, SIGSTOP), 0);  // hung: alive, but neither computing nor beating
  const auto stopped_at = Clock::now();
  const int exit_code = launcher.wait(60.0);
  const double seconds = std::chrono::duration<double>(Clock::now() - stopped_at).count();
  if (exit_code < 0) kill(rank1, SIGKILL);  // a stopped process ignores the SIGTERM it gets when the launcher dies
  const std::string out = launcher.output();
  EXPECT_EQ(exit_code, 1) << out;
  EXPECT_NE(out.find("[rank 0] keel train: error: rank 1 (dp 1, tp 0, pp 0) has stopped its heartbeat (dead or hung)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("keel launch: rank 0 exited with status 1; stopping the other ranks"), std::string::npos) << out;
  // parallel.timeout_s (6) + the diagnosis (2.5) + rank 1 finding rank 0 gone, well inside --grace-s 20.
  EXPECT_LT(seconds, 19.0) << out;
  std::filesystem::remove_all(run_dir);
}

TEST(Launch, AKilledRankStopsTheJobBeforeAnyTimeout) {
  const std::string run_dir = fresh_dir("launch-killed");
  Launcher launcher(two_rank_training(run_dir, 60));
  ASSERT_TRUE(launcher.wait_for_output("] batch:", 2, 120.0)) << launcher.output();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const pid_t rank1 = rank_pid(launcher.pid(), 1);
  ASSERT_GT(rank1, 0) << launcher.output();
  ASSERT_EQ(kill(rank1, SIGKILL), 0);
  const auto killed_at = Clock::now();
  const int exit_code = launcher.wait(60.0);
  const double seconds = std::chrono::duration<double>(Clock::now() - killed_at).count();
  const std::string out = launcher.output();
  EXPECT_EQ(exit_code, 128 + 9) << out;
  EXPECT_NE(out.find("keel launch: rank 1 was killed by signal 9"), std::string::npos) << out;
  EXPECT_LT(seconds, 20.0) << "the job must not wait for parallel.timeout_s (60 s)\n" << out;
  std::filesystem::remove_all(run_dir);
}

TEST(Launch, HelpListsTheOptions) {
  const LaunchResult r = launch("--help", 30.0);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* option : {"--nproc", "--master-addr", "--master-port", "--grace-s"})
    EXPECT_NE(r.output.find(option), std::string::npos) << r.output;
}

TEST(Launch, UnknownProgramIsOneClearError) {
  const LaunchResult r = launch("--nproc 2 -- keel-no-such-program-xyz", 30.0);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("keel launch: error: cannot run 'keel-no-such-program-xyz': not found on PATH"),
            std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace keel::testing

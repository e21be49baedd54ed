// Why: a `keel launch` that dies outright (SIGKILL, the OOM killer, a closed terminal's session leader) takes the
// read ends of its ranks' stdout/stderr pipes with it. The ranks must not die of SIGPIPE on their next log line:
// they get SIGTERM from the kernel (PR_SET_PDEATHSIG), finish the step, save a checkpoint that `keel resume`
// continues from, and exit 0, exactly as after Ctrl-C. A launcher killed while the ranks are still joining the job
// leaves nothing behind: no process and no run dir.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/metrics/metrics_reader.h"
#include "faults/fault_support.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Makes this test process the reaper of its orphaned descendants for its lifetime, so that the ranks of a killed
// launcher become its children and their exit statuses can be read with waitpid().
class ChildSubreaper {
 public:
  ChildSubreaper() { ok_ = ::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0; }
  ~ChildSubreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 0); }
  bool ok() const { return ok_; }

 private:
  bool ok_ = false;
};

// `keel launch ARGUMENTS` in the background, its output going to a file (the ranks' pipes end in the launcher).
pid_t start_launcher(const std::string& arguments, const std::string& output_path) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const std::string command =
        std::string("exec ") + KEEL_BINARY + " launch " + arguments + " >" + output_path + " 2>&1";
    ::execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
    ::_exit(127);
  }
  return pid;
}

// The processes whose parent is `parent`, by /proc scan.
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> children;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat_file(entry.path() / "stat");
    const std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    const size_t comm_end = stat.rfind(')');
    if (comm_end == std::string::npos) continue;
    std::istringstream fields(stat.substr(comm_end + 1));
    std::string state;
    pid_t ppid = 0;
    fields >> state >> ppid;
    if (ppid == parent) children.push_back(static_cast<pid_t>(std::stoi(name)));
  }
  return children;
}

// Waits until `count` children of `parent` exist (at most `seconds`); returns those found.
std::vector<pid_t> wait_for_children(pid_t parent, size_t count, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  std::vector<pid_t> found = children_of(parent);
  while (found.size() < count && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    found = children_of(parent);
  }
  return found;
}

// Reaps each of `pids` (our children once their launcher died, see ChildSubreaper); pid -> wait status. A pid
// still running after `seconds` is missing from the result and is SIGKILLed so that no test leaves it behind.
std::map<pid_t, int> reap(const std::vector<pid_t>& pids, double seconds) {
  std::map<pid_t, int> statuses;
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (statuses.size() < pids.size() && Clock::now() < deadline) {
    for (pid_t pid : pids) {
      int status = 0;
      if (!statuses.count(pid) && ::waitpid(pid, &status, WNOHANG) == pid) statuses[pid] = status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (pid_t pid : pids) {
    if (statuses.count(pid)) continue;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  return statuses;
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "exit status " + std::to_string(WEXITSTATUS(status));
}

TEST(LaunchFaults, KilledLauncherRanksSaveAStopCheckpointAndExitZero) {
  ChildSubreaper reaper;
  ASSERT_TRUE(reaper.ok()) << "cannot become a child subreaper";
  const std::string run_dir = fresh_dir("launch-sigkill"), resumed = fresh_dir("launch-sigkill-resumed");
  const std::string output = run_dir + ".out";
  const pid_t launcher = start_launcher(
      "--nproc 2 -- keel train --config " + tiny_config() + " " + test_data_override() +
          " --set parallel.dp=2 --set train.steps=100000 --set metrics.flush_every=1 --set train.log_every=1"
          " --run-dir " +
          run_dir,
      output);
  ASSERT_GT(launcher, 0);
  const std::vector<pid_t> ranks = wait_for_children(launcher, 2, 60.0);
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  while (readable_rows(run_dir + "/metrics.h5") < 3 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_GE(readable_rows(run_dir + "/metrics.h5"), 3u) << read_text_file(output);
  ASSERT_EQ(ranks.size(), 2u) << read_text_file(output);

  ASSERT_EQ(::kill(launcher, SIGKILL), 0);
  ASSERT_EQ(::waitpid(launcher, nullptr, 0), launcher);
  const std::map<pid_t, int> statuses = reap(ranks, 60.0);
  const std::string log = read_text_file(run_dir + "/train.log");
  ASSERT_EQ(statuses.size(), 2u) << "a rank was still running 60 s after its launcher died\n" << log;
  for (const auto& [pid, status] : statuses)
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "rank pid " << pid << ": " << describe(status) << "\n"
                                                               << log;

  // The stop was a clean one: logged, recorded as an event, and committed as a checkpoint.
  EXPECT_NE(log.find("stop signal received"), std::string::npos) << log;
  EXPECT_NE(log.find("(stop signal)"), std::string::npos) << log;
  bool stop_event = false;
  for (const auto& event : metrics::MetricsReader(run_dir + "/metrics.h5").read_events())
    stop_event = stop_event || event.kind == "stop";
  EXPECT_TRUE(stop_event) << log;
  std::string latest = read_text_file(run_dir + "/checkpoints/latest");
  latest = latest.substr(0, latest.find('\n'));
  ASSERT_FALSE(latest.empty()) << log;
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/" + latest + "/manifest.json")) << latest << "\n" << log;
  const int64_t stopped_at = std::stoll(latest.substr(latest.find('-') + 1));
  ASSERT_GE(stopped_at, 3) << latest;

  // ... and the run goes on from it (in one process: a resume may change the layout).
  const ProcessResult r = run_keel("resume --from " + run_dir + " --run-dir " + resumed +
                                   " --set parallel.dp=1 --set train.steps=" + std::to_string(stopped_at + 2));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed at step " + std::to_string(stopped_at)), std::string::npos) << r.output;
  EXPECT_EQ(metrics::MetricsReader(resumed + "/metrics.h5").read_int64("/train/step").size(), 2u) << r.output;
  fs::remove_all(run_dir);
  fs::remove_all(resumed);
  fs::remove(output);
}

TEST(LaunchFaults, LauncherKilledDuringRendezvousLeavesNoProcessAndNoRunDir) {
  ChildSubreaper reaper;
  ASSERT_TRUE(reaper.ok()) << "cannot become a child subreaper";
  const std::string run_dir = fresh_dir("launch-sigkill-join");
  const std::string output = run_dir + ".out";
  // Rank 1 never joins, so rank 0 waits in the rendezvous (for up to parallel.timeout_s = 120 s).
  const pid_t launcher =
      start_launcher("--nproc 2 -- sh -c 'if [ \"$RANK\" = 1 ]; then exec sleep 600; fi; exec " +
                         std::string(KEEL_BINARY) + " train --config " + tiny_config() + " " + test_data_override() +
                         " --set parallel.dp=2 --set parallel.timeout_s=120 --run-dir " + run_dir + "'",
                     output);
  ASSERT_GT(launcher, 0);
  const std::vector<pid_t> ranks = wait_for_children(launcher, 2, 60.0);
  ASSERT_EQ(ranks.size(), 2u) << read_text_file(output);
  std::this_thread::sleep_for(std::chrono::seconds(2));  // rank 0 is in the rendezvous by now

  ASSERT_EQ(::kill(launcher, SIGKILL), 0);
  ASSERT_EQ(::waitpid(launcher, nullptr, 0), launcher);
  const auto killed_at = Clock::now();
  const std::map<pid_t, int> statuses = reap(ranks, 30.0);
  const double seconds = std::chrono::duration<double>(Clock::now() - killed_at).count();
  EXPECT_EQ(statuses.size(), 2u) << "a rank was still running 30 s after its launcher died";
  for (const auto& [pid, status] : statuses)  // nothing to save yet: SIGTERM's default action ends the rank
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "pid " << pid << ": " << describe(status);
  EXPECT_LT(seconds, 10.0);
  EXPECT_FALSE(fs::exists(run_dir)) << "a rank that never joined the job must not claim the run dir";
  fs::remove_all(run_dir);
  fs::remove(output);
}

}  // namespace
}  // namespace keel::testing

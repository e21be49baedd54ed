// Why: the parallel-layout contract, end to end with the real binary and several local processes on Gloo: every DP x TP
// x PP layout trains the same model as one process (fp32 and bf16-mixed), ZeRO-1 equals plain DP, a checkpoint saved in
// one layout resumes in another, and faults (a killed or hung rank, a failed save on one rank, a NaN on one rank) end
// or skip cleanly with the rank named. Tiny shapes: the whole file runs in a few minutes on two cores.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/metrics/metrics_reader.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using metrics::MetricsReader;

// `keel launch --nproc N -- keel train` on the tiny config, `steps` steps, with extra --set flags.
ProcessResult launch_train(int nproc, const std::string& run_dir, const std::string& extra,
                           const std::string& env = "") {
  return run_keel_with_env(env, "launch --nproc " + std::to_string(nproc) + " -- " + KEEL_BINARY + " train --config " +
                                    tiny_config() + " " + test_data_override() + " --run-dir " + run_dir + " " + extra);
}

std::string layout_flags(int dp, int tp, int pp) {
  return "--set parallel.dp=" + std::to_string(dp) + " --set parallel.tp=" + std::to_string(tp) +
         " --set parallel.pp=" + std::to_string(pp);
}

// The whole model's weights of a run's newest checkpoint, by name.
std::map<std::string, torch::Tensor> final_weights(const std::string& run_dir) {
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run_dir);
  const checkpoint::TrainingState st = checkpoint::read_full_state(ckpt.dir, ckpt.manifest, -1);
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : st.model) out[name] = t;
  return out;
}

std::vector<double> losses(const std::string& run_dir) {
  return MetricsReader(run_dir + "/metrics.h5").read_double("/train/loss");
}

const std::string kSteps = "--set train.steps=3 --set checkpoint.at_end=true --set metrics.per_tensor=false";

// The single-process reference of a precision, trained once per test binary.
const std::string& reference_run(const std::string& precision) {
  static std::map<std::string, std::string> runs;
  auto it = runs.find(precision);
  if (it != runs.end()) return it->second;
  const std::string dir = fresh_dir("parallel-ref-" + precision);
  const ProcessResult r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " +
                                   dir + " " + kSteps + " --set train.precision=" + precision);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return runs[precision] = dir;
}

struct LayoutCase {
  int dp, tp, pp;
  std::string precision;
  bool sp = false;  // parallel.sp (sequence parallelism; TP layouts only)
};

class ParallelLayouts : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(ParallelLayouts, MatchTheSingleProcessRun) {
  const LayoutCase c = GetParam();
  const bool fp32 = c.precision == "fp32";
  const std::string reference = reference_run(c.precision);
  const std::string dir = fresh_dir("parallel-" + std::to_string(c.dp) + std::to_string(c.tp) + std::to_string(c.pp) +
                                    c.precision + (c.sp ? "-sp" : ""));
  const ProcessResult r = launch_train(c.dp * c.tp * c.pp, dir,
                                       kSteps + " --set train.precision=" + c.precision + " " +
                                           layout_flags(c.dp, c.tp, c.pp) + (c.sp ? " --set parallel.sp=true" : ""));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Losses: fp32 differs only by reduction order; bf16 also by where the casts fall.
  const std::vector<double> want = losses(reference), got = losses(dir);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(got[i], want[i], (fp32 ? 1e-5 : 2e-2) * std::abs(want[i])) << "step " << i;
  // Weights after the updates: the same whole tensors, reassembled from the layout's shards.
  const auto want_w = final_weights(reference), got_w = final_weights(dir);
  ASSERT_EQ(got_w.size(), want_w.size());
  for (const auto& [name, w] : want_w) {
    ASSERT_TRUE(got_w.count(name)) << name;
    const double diff = (got_w.at(name) - w).abs().max().item<double>();
    EXPECT_LT(diff, fp32 ? 2e-4 : 2e-2) << name;
  }
  // The checkpoint records the layout it was saved in.
  EXPECT_EQ(checkpoint::resolve_checkpoint(dir).manifest.layout.world_size(), c.dp * c.tp * c.pp);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ParallelLayouts,
                         ::testing::Values(LayoutCase{2, 1, 1, "fp32"}, LayoutCase{1, 2, 1, "fp32"},
                                           LayoutCase{1, 1, 2, "fp32"}, LayoutCase{2, 2, 2, "fp32"},
                                           LayoutCase{2, 1, 1, "bf16-mixed"}, LayoutCase{1, 2, 1, "bf16-mixed"},
                                           LayoutCase{1, 1, 2, "bf16-mixed"}, LayoutCase{2, 2, 2, "bf16-mixed"},
                                           // Every layout with TP again under sequence parallelism.
                                           LayoutCase{1, 2, 1, "fp32", true}, LayoutCase{2, 2, 2, "fp32", true},
                                           LayoutCase{1, 2, 1, "bf16-mixed", true},
                                           LayoutCase{2, 2, 2, "bf16-mixed", true}),
                         [](const ::testing::TestParamInfo<LayoutCase>& info) {
                           const LayoutCase& c = info.param;
                           return "dp" + std::to_string(c.dp) + "tp" + std::to_string(c.tp) + "pp" +
                                  std::to_string(c.pp) + (c.sp ? "sp" : "") +
                                  (c.precision == "fp32" ? "_fp32" : "_bf16");
                         });

// model.recompute through the trainer: the same losses and final weights as the reference, bit for bit (fp32, CPU).
TEST(ParallelRun, RecomputedRunsAreBitIdenticalToTheReference) {
  const std::string reference = reference_run("fp32");
  for (const std::string policy : {"full", "selective"}) {
    const std::string dir = fresh_dir("parallel-recompute-" + policy);
    const ProcessResult r =
        run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + dir + " " + kSteps +
                 " --set train.precision=fp32 --set model.recompute=" + policy);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(losses(dir), losses(reference)) << policy;
    const auto want = final_weights(reference), got = final_weights(dir);
    for (const auto& [name, w] : want) EXPECT_TRUE(torch::equal(got.at(name), w)) << policy << " " << name;
  }
}

TEST(ParallelRun, ZeroOneMatchesPlainDataParallel) {
  const std::string plain = fresh_dir("parallel-dp"), zero = fresh_dir("parallel-zero");
  ASSERT_EQ(launch_train(2, plain, kSteps + " --set train.precision=fp32 --set parallel.dp=2").exit_code, 0);
  const ProcessResult r =
      launch_train(2, zero, kSteps + " --set train.precision=fp32 --set parallel.dp=2 --set parallel.zero=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(losses(zero), losses(plain));
  const auto a = final_weights(plain), b = final_weights(zero);
  for (const auto& [name, w] : a) EXPECT_TRUE(torch::equal(b.at(name), w)) << name;
  // Each DP rank saved only its share of the optimizer state; together they are the whole.
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(zero);
  const auto st = checkpoint::read_full_state(ckpt.dir, ckpt.manifest, -1);
  EXPECT_EQ(st.optimizer.size(), 2 * a.size());  // exp_avg and exp_avg_sq of every tensor
}

TEST(ParallelRun, SavedAt2x1x2ResumesAt1x2x1WithTheSameLoss) {
  const std::string straight = fresh_dir("parallel-straight"), first = fresh_dir("parallel-first"),
                    second = fresh_dir("parallel-second");
  const std::string common =
      " --set train.precision=fp32 --set train.steps=4 --set optim.decay_steps=4 --set metrics.per_tensor=false";
  ASSERT_EQ(launch_train(4, straight, common + " " + layout_flags(2, 1, 2)).exit_code, 0);
  ASSERT_EQ(launch_train(4, first, common + " --set train.steps=2 " + layout_flags(2, 1, 2)).exit_code, 0);
  const ProcessResult r =
      run_keel_with_env("", "launch --nproc 2 -- " + std::string(KEEL_BINARY) + " resume --from " + first +
                                " --run-dir " + second + " --set train.steps=4 " + layout_flags(1, 2, 1));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<double> want = losses(straight), got = losses(second);
  ASSERT_EQ(got.size(), 2u);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i + 2], 1e-5 * want[i + 2]) << "step " << i + 2;
  EXPECT_NE(r.output.find("resharding"), std::string::npos) << r.output;
}

TEST(ParallelRun, LayoutThatDoesNotMatchTheRanksIsRefusedNamingTheKeys) {
  const std::string dir = fresh_dir("parallel-mismatch");
  const ProcessResult r = launch_train(2, dir, kSteps + " --set parallel.dp=4 --set train.grad_accum=4");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("parallel.dp x parallel.tp x parallel.pp = 4 x 1 x 1 = 4"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/metrics.h5"));
  const ProcessResult alone = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " +
                                       dir + " --set parallel.dp=2");
  EXPECT_NE(alone.exit_code, 0);
  EXPECT_NE(alone.output.find("the job has 1 rank (one process; start N ranks with keel launch"), std::string::npos)
      << alone.output;
}

TEST(ParallelRun, NanOnOneRankIsSkippedAndReportedWithThatRank) {
  const std::string dir = fresh_dir("parallel-nan");
  const ProcessResult r = launch_train(2, dir, kSteps + " --set parallel.dp=2", "KEEL_TEST_FAULT=nan_grad:1:1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<int64_t> skipped = MetricsReader(dir + "/metrics.h5").read_int64("/train/skipped");
  EXPECT_EQ(skipped, (std::vector<int64_t>{0, 1, 0}));
  bool found = false;
  for (const auto& e : MetricsReader(dir + "/metrics.h5").read_events()) {
    if (e.kind == "skip" && e.step == 1) {
      found = true;
      EXPECT_NE(e.text.find("rank 1 (dp 1, tp 0, pp 0)"), std::string::npos) << e.text;
      EXPECT_EQ(e.text.find("rank 0"), std::string::npos) << e.text;
    }
  }
  EXPECT_TRUE(found);
}

TEST(ParallelRun, SaveFailingOnOneRankIsCommittedByNone) {
  const std::string dir = fresh_dir("parallel-savefail");
  const ProcessResult r = launch_train(2, dir, "--set train.steps=4 --set checkpoint.every=2 --set parallel.dp=2",
                                       "KEEL_TEST_FAULT=save_fail:1:4");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 1 (dp 1, tp 0, pp 0) could not write its file"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("the latest checkpoint is still"), std::string::npos) << r.output;
  expect_only_checkpoint(dir, /*kept_step=*/2, /*failed_step=*/4);
}

// Two ranks started torchrun-style without a launcher; returns their pids. Output goes to LOG_r.
std::vector<pid_t> start_ranks(int world, const std::string& run_dir, const std::string& extra,
                               const std::string& log) {
  const int port = 20000 + static_cast<int>(::getpid() % 20000);
  std::vector<pid_t> pids;
  for (int rank = 0; rank < world; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      const std::string command = "RANK=" + std::to_string(rank) + " WORLD_SIZE=" + std::to_string(world) +
                                  " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " exec " +
                                  KEEL_BINARY + " train --config " + tiny_config() + " " + test_data_override() +
                                  " --run-dir " + run_dir + " " + extra + " > " + log + std::to_string(rank) + " 2>&1";
      execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
      _exit(127);
    }
    pids.push_back(pid);
  }
  return pids;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Waits for `pid` at most `seconds`; returns its exit status (or -1 on timeout, after killing it).
int wait_exit(pid_t pid, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int status = 0;
  while (std::chrono::steady_clock::now() < until) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

void expect_survivor_names_missing_rank(const std::string& name, int signal) {
  const std::string dir = fresh_dir(name), log = dir + "-log-";
  const double timeout_s = 15.0;
  auto pids = start_ranks(2, dir, "--set train.steps=100000 --set parallel.dp=2 --set parallel.timeout_s=15", log);
  // Let training start (rank 0 writes metrics rows), then take rank 1 away.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (readable_rows(dir + "/metrics.h5") < 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  kill(pids[1], signal);
  const auto killed_at = std::chrono::steady_clock::now();
  const int status = wait_exit(pids[0], timeout_s + 30.0);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  kill(pids[1], SIGKILL);
  waitpid(pids[1], nullptr, 0);
  const std::string output = read_file(log + "0");
  EXPECT_NE(status, 0) << output;
  EXPECT_NE(status, -1) << "rank 0 did not exit within the timeout: " << output;
  EXPECT_LT(took, timeout_s + 20.0);
  EXPECT_NE(output.find("rank 1 (dp 1, tp 0, pp 0)"), std::string::npos) << output;
}

TEST(ParallelRun, KilledRankMakesTheOthersExitNamingIt) {
  expect_survivor_names_missing_rank("parallel-killed", SIGKILL);
}

TEST(ParallelRun, HungRankMakesTheOthersExitWithinTheTimeoutNamingIt) {
  expect_survivor_names_missing_rank("parallel-hung", SIGSTOP);
}

}  // namespace
}  // namespace keel::testing

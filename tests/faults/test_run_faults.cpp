// Why: the faults that used to lose or corrupt a user's run dir or end a broken run with exit 0: two processes
// writing one run dir, `--force` on a directory Keel did not make, a resume that fails after the run dir is
// claimed, plugin values that poison the weights, and a failure after a step's update. Each is driven through
// the `keel` binary as a user meets it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "faults/fault_support.h"

namespace {

namespace fs = std::filesystem;
using keel::metrics::MetricsReader;
using namespace keel::testing;

std::string train_args(const std::string& run_dir, const std::string& extra) {
  return "train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir + " " + extra;
}

// Waits (bounded) until the run at `run_dir` has flushed `rows` metrics rows.
void wait_for_rows(const std::string& run_dir, size_t rows) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  while (readable_rows(run_dir + "/metrics.h5") < rows && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_GE(readable_rows(run_dir + "/metrics.h5"), rows) << "the run in " << run_dir << " did not start";
}

bool has_event(const std::string& run_dir, const std::string& kind, const std::string& text = "") {
  for (const auto& e : MetricsReader(run_dir + "/metrics.h5").read_events())
    if (e.kind == kind && e.text.find(text) != std::string::npos) return true;
  return false;
}

TEST(RunDirFaults, LiveRunDirIsRefusedToEveryOtherWriter) {
  const std::string run_dir = fresh_dir("live");
  const std::string other = fresh_dir("live-other");
  ASSERT_EQ(run_keel(train_args(other, "--set train.steps=2 --set checkpoint.every=2")).exit_code, 0);
  const pid_t pid = spawn_train(run_dir, "--set train.steps=100000 --set metrics.flush_every=1");
  wait_for_rows(run_dir, 2);
  const std::string in_use = "is in use by pid " + std::to_string(pid);

  const auto forced = run_keel(train_args(run_dir, "--set train.steps=3 --force"));
  EXPECT_NE(forced.exit_code, 0);
  EXPECT_NE(last_line(forced.output).find(in_use), std::string::npos) << forced.output;
  const auto resumed = run_keel("resume --from " + other + " --run-dir " + run_dir + " --force");
  EXPECT_NE(resumed.exit_code, 0);
  EXPECT_NE(last_line(resumed.output).find(in_use), std::string::npos) << resumed.output;
  const auto eval = run_keel("eval " + other + " --batches 1 --memorization-samples 0 --out " + run_dir + "/e.h5");
  EXPECT_NE(eval.exit_code, 0);
  EXPECT_NE(last_line(eval.output).find(in_use), std::string::npos) << eval.output;
  EXPECT_FALSE(fs::exists(run_dir + "/e.h5"));

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // One run's rows only: steps 0, 1, 2, ... in order (nothing interleaved from a refused writer).
  const auto steps = MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step");
  for (size_t i = 0; i < steps.size(); ++i) ASSERT_EQ(steps[i], static_cast<int64_t>(i));

  // The lock died with its process: --force now replaces the run.
  const auto after = run_keel(train_args(run_dir, "--set train.steps=3 --force"));
  EXPECT_EQ(after.exit_code, 0) << after.output;
  EXPECT_EQ(MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step").size(), 3u);
}

TEST(RunDirFaults, TwoTrainersRacingForOneEmptyDirLeaveOneIntactRun) {
  for (int round = 0; round < 3; ++round) {
    const std::string run_dir = fresh_dir("race" + std::to_string(round));
    fs::create_directories(run_dir);
    const pid_t a = spawn_train(run_dir, "--set train.steps=3 --set optim.lr=1e-3");
    const pid_t b = spawn_train(run_dir, "--set train.steps=3 --set optim.lr=2e-3");
    int status_a = 0, status_b = 0;
    waitpid(a, &status_a, 0);
    waitpid(b, &status_b, 0);
    ASSERT_TRUE(WIFEXITED(status_a) && WIFEXITED(status_b));
    const int winners = (WEXITSTATUS(status_a) == 0) + (WEXITSTATUS(status_b) == 0);
    EXPECT_EQ(winners, 1) << "round " << round;
    // The winner's config is the one in the run dir, and its metrics are whole.
    const std::string config = read_text_file(run_dir + "/config.ini");
    const bool a_won = WEXITSTATUS(status_a) == 0;
    EXPECT_NE(config.find(a_won ? "lr = 0.001" : "lr = 0.002"), std::string::npos) << config;
    EXPECT_EQ(MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step").size(), 3u);
  }
}

TEST(RunDirFaults, ForceNeverEmptiesADirectoryKeelDidNotCreate) {
  const std::string dir = fresh_dir("thesis");
  fs::create_directories(dir + "/checkpoints");
  std::ofstream(dir + "/checkpoints/thesis.tex") << "\\chapter{Results}\n";
  std::ofstream(dir + "/config.ini") << "my own notes\n";
  const auto result = run_keel(train_args(dir, "--set train.steps=2 --force"));
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(last_line(result.output).find("was not created by keel"), std::string::npos) << result.output;
  EXPECT_EQ(read_text_file(dir + "/checkpoints/thesis.tex"), "\\chapter{Results}\n");
  EXPECT_EQ(read_text_file(dir + "/config.ini"), "my own notes\n");
  EXPECT_FALSE(fs::exists(dir + "/metrics.h5"));
}

// A rank file that lacks one tensor (its checksum re-made, so only the loader can tell) fails after the run
// dir is claimed: the error names the tensor and the checkpoint, and NEW_DIR is left as it was (absent), so the
// same command gives the same error again.
TEST(RunDirFaults, FailedResumeNamesTheTensorAndLeavesNoDebris) {
  const std::string parent = fresh_dir("debris-parent");
  ASSERT_EQ(run_keel(train_args(parent, "--set train.steps=4 --set checkpoint.every=4")).exit_code, 0);
  const std::string ckpt = parent + "/checkpoints/step-00000004";
  const std::string script =
      "import h5py, hashlib, json, os, sys\n"
      "d = sys.argv[1]\n"
      "f = h5py.File(os.path.join(d, 'rank-00000.h5'), 'r+')\n"
      "names = []\n"
      "f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) and 'final_norm' in n else None)\n"
      "victim = [n for n in names if n.startswith('model')][0]\n"
      "del f[victim]\n"
      "f.close()\n"
      "m = json.load(open(os.path.join(d, 'manifest.json')))\n"
      "for e in m['files']:\n"
      "    p = os.path.join(d, e['name'])\n"
      "    e['bytes'] = os.path.getsize(p)\n"
      "    e['sha256'] = hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
      "json.dump(m, open(os.path.join(d, 'manifest.json'), 'w'))\n"
      "print(victim)\n";
  const std::string script_path = parent + "/drop_tensor.py";
  std::ofstream(script_path) << script;
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script_path + " " + ckpt + " > " + parent + "/victim.txt").c_str()), 0);
  const std::string new_dir = fresh_dir("debris-new");
  const std::string command = "resume --from " + ckpt + " --run-dir " + new_dir;
  const auto first = run_keel(command);
  EXPECT_NE(first.exit_code, 0);
  EXPECT_NE(last_line(first.output).find("final_norm"), std::string::npos) << first.output;
  EXPECT_NE(last_line(first.output).find(ckpt), std::string::npos) << first.output;
  EXPECT_FALSE(fs::exists(new_dir)) << "a resume that never trained left files in " << new_dir;
  const auto second = run_keel(command);
  EXPECT_EQ(last_line(second.output), last_line(first.output));
}

TEST(PluginValueFaults, NonFiniteLearningRateStopsTheRunNamingThePlugin) {
  const std::string run_dir = fresh_dir("nan-lr");
  const auto result = run_keel(train_args(
      run_dir, "--set train.steps=12 --set checkpoint.every=4 --plugin lr_schedule=" + fixture_plugin("lr_spike") +
                   " --plugin-arg lr_spike.at_step=6 --plugin-arg lr_spike.factor=nan"));
  EXPECT_NE(result.exit_code, 0) << result.output;
  const std::string line = last_line(result.output);
  EXPECT_NE(line.find("plugin lr_spike"), std::string::npos) << result.output;
  EXPECT_NE(line.find("learning_rate()"), std::string::npos) << result.output;
  EXPECT_NE(line.find("nan"), std::string::npos) << result.output;
  EXPECT_NE(line.find("step 6"), std::string::npos) << result.output;
  // The checkpoint of step 4 is intact and resumable; no later one exists.
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/step-00000004/manifest.json"));
  EXPECT_FALSE(fs::exists(run_dir + "/checkpoints/step-00000008"));
  EXPECT_TRUE(has_event(run_dir, "error", "lr_spike"));
  for (double loss : MetricsReader(run_dir + "/metrics.h5").read_double("/train/loss"))
    EXPECT_TRUE(std::isfinite(loss));
}

TEST(PluginValueFaults, OutOfRangeDecisionValuesAreRefused) {
  for (const std::string factor : {"nan", "inf", "-1", "0"}) {
    const std::string run_dir = fresh_dir("bad-factor");
    const auto result =
        run_keel(train_args(run_dir, "--set train.steps=8 --plugin spike_handler=" + fixture_plugin("bad_decision") +
                                         " --plugin-arg bad_decision.lr_factor=" + factor));
    EXPECT_NE(result.exit_code, 0) << factor << ": " << result.output;
    const std::string line = last_line(result.output);
    EXPECT_NE(line.find("plugin bad_decision"), std::string::npos) << result.output;
    EXPECT_NE(line.find("decide()"), std::string::npos) << result.output;
    EXPECT_NE(line.find("lr_factor"), std::string::npos) << result.output;
    fs::remove_all(run_dir);
  }
  const std::string run_dir = fresh_dir("bad-skip");
  const auto skip =
      run_keel(train_args(run_dir, "--set train.steps=8 --plugin spike_handler=" + fixture_plugin("bad_decision") +
                                       " --plugin-arg bad_decision.lr_factor=1" +
                                       " --plugin-arg bad_decision.skip_data=nosuchsource:chunk:1"));
  EXPECT_NE(skip.exit_code, 0) << skip.output;
  EXPECT_NE(last_line(skip.output).find("skip_data"), std::string::npos) << skip.output;
}

TEST(PluginValueFaults, FailureAfterAnUpdateSavesThatStepAndExitsNonZero) {
  const std::string run_dir = fresh_dir("observer-throws");
  const auto result =
      run_keel(train_args(run_dir, "--set train.steps=10 --plugin observers=" + fixture_plugin("throwing_observer") +
                                       " --plugin-arg throwing_observer.at_step=4"));
  EXPECT_NE(result.exit_code, 0) << result.output;
  const std::string line = last_line(result.output);
  EXPECT_NE(line.find("throwing_observer"), std::string::npos) << result.output;
  EXPECT_NE(line.find("step 4"), std::string::npos) << result.output;
  // The state after step 4 (5 steps done) is saved and resumable.
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/step-00000005/manifest.json")) << result.output;
  EXPECT_TRUE(has_event(run_dir, "error", "throwing_observer"));
  EXPECT_NE(read_text_file(run_dir + "/train.log").find("throwing_observer fixture"), std::string::npos);
  const std::string resumed = fresh_dir("observer-resumed");
  const auto resume = run_keel("resume --from " + run_dir + " --run-dir " + resumed + " --set train.steps=7");
  EXPECT_EQ(resume.exit_code, 0) << resume.output;
}

TEST(PluginValueFaults, StopMessageNamesTheCheckpointItSaves) {
  const std::string run_dir = fresh_dir("stop-numbering");
  const pid_t pid = spawn_train(run_dir, "--set train.steps=100000 --set metrics.flush_every=1");
  wait_for_rows(run_dir, 3);
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  const auto steps = MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step");
  ASSERT_FALSE(steps.empty());
  const int64_t last = steps.back();
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(last + 1));
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/" + name));
  const std::string log = read_text_file(run_dir + "/train.log");
  EXPECT_NE(log.find("stop signal received during step " + std::to_string(last) + ": saving checkpoint " + name),
            std::string::npos)
      << log;
}

}  // namespace

namespace {

TEST(PluginValueFaults, PoisonedWeightsStopTheRunInsteadOfSkippingForever) {
  const std::string run_dir = fresh_dir("poisoned");
  const auto result =
      run_keel(train_args(run_dir, "--set train.steps=20 --set checkpoint.every=4 --plugin grad_transform=" +
                                       fixture_plugin("poison_grads") + " --plugin-arg poison_grads.at_step=5"));
  EXPECT_NE(result.exit_code, 0) << result.output;
  const std::string line = last_line(result.output);
  EXPECT_NE(line.find("step 6: the weights are not finite"), std::string::npos) << result.output;
  EXPECT_NE(line.find("poison_grads"), std::string::npos) << result.output;
  // The clean checkpoint stays; no later one exists.
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/step-00000004/manifest.json"));
  EXPECT_FALSE(fs::exists(run_dir + "/checkpoints/step-00000008"));
  EXPECT_TRUE(has_event(run_dir, "error", "not finite"));
}

}  // namespace

namespace {

TEST(ControlFaults, RequestsThatCouldNeverApplyAreRefused) {
  const std::string ended = fresh_dir("control-ended");
  ASSERT_EQ(run_keel(train_args(ended, "--set train.steps=2")).exit_code, 0);
  const auto dead = run_keel("control " + ended + " swap spike_handler=zscore_skip");
  EXPECT_NE(dead.exit_code, 0);
  EXPECT_NE(last_line(dead.output).find("has no live run"), std::string::npos) << dead.output;
  EXPECT_FALSE(fs::exists(ended + "/control"));

  const std::string live = fresh_dir("control-live");
  const pid_t pid = spawn_train(live, "--set train.steps=100000 --set metrics.flush_every=1");
  wait_for_rows(live, 3);
  const auto missing = run_keel("control " + live + " swap spike_handler=/nonexistent/libnothing.so");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(last_line(missing.output).find("/nonexistent/libnothing.so"), std::string::npos) << missing.output;
  const auto bad_arg =
      run_keel("control " + live + " swap spike_handler=zscore_skip --plugin-arg zscore_skip.nosuchkey=1");
  EXPECT_NE(bad_arg.exit_code, 0);
  EXPECT_NE(last_line(bad_arg.output).find("nosuchkey"), std::string::npos) << bad_arg.output;
  const auto bad_slot = run_keel("control " + live + " swap nosuchslot=zscore_skip");
  EXPECT_NE(bad_slot.exit_code, 0);
  const auto past = run_keel("control " + live + " swap spike_handler=zscore_skip --at-step 1");
  EXPECT_NE(past.exit_code, 0);
  EXPECT_NE(last_line(past.output).find("in the past"), std::string::npos) << past.output;
  // None of them left a request behind; a good one is applied and answered.
  EXPECT_FALSE(fs::exists(live + "/control"));
  const auto good = run_keel("control " + live + " swap spike_handler=zscore_skip --wait-s 120 --json");
  EXPECT_EQ(good.exit_code, 0) << good.output;
  EXPECT_NE(good.output.find("\"status\":\"done\""), std::string::npos) << good.output;
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(has_event(live, "plugin_swap", "zscore_skip"));
}

}  // namespace

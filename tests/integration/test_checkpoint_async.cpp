// Why: checkpoint.async = true must keep every promise of a synchronous save while training goes on during the
// write (docs/checkpoints.md, "Asynchronous saves"): the same bytes in every tensor and state of the rank file as
// a synchronous save of the same step, the same training trajectory, a kill -9 at any moment leaves the newest
// committed checkpoint valid and resumable, a stop signal waits for the save in flight, and a write that fails on
// the background thread stops the run with a message naming the checkpoint and the rank, committing nothing.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/training_state.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using namespace keel::checkpoint;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

std::string args(const std::string& extra) {
  return "--config " + tiny_config() + " " + test_data_override() + " --set optim.decay_steps=20 " + extra;
}

// The same names, dtypes, shapes and bytes, in the same order.
void expect_same_bytes(const NamedTensors& a, const NamedTensors& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto& [name, x] = a[i];
    const auto& y = b[i].second;
    ASSERT_EQ(name, b[i].first) << what;
    ASSERT_EQ(x.scalar_type(), y.scalar_type()) << what << " " << name;
    ASSERT_EQ(x.sizes(), y.sizes()) << what << " " << name;
    const auto bytes = static_cast<size_t>(x.numel()) * x.element_size();
    EXPECT_EQ(std::memcmp(x.contiguous().data_ptr(), y.contiguous().data_ptr(), bytes), 0) << what << " " << name;
  }
}

// config.ini without its `async = true` line.
std::string without_async_line(std::string ini) {
  const std::string line = "async = true\n";
  const size_t at = ini.find(line);
  if (at != std::string::npos) ini.erase(at, line.size());
  return ini;
}

std::vector<std::string> tmp_dirs(const std::string& run) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(run + "/checkpoints")) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp") != std::string::npos) out.push_back(name);
  }
  return out;
}

}  // namespace

TEST(AsyncCheckpoint, WritesTheSameStateAsASynchronousSaveAndLeavesTrainingUnchanged) {
  const std::string sync = fresh_dir("async-ref-sync"), async = fresh_dir("async-ref-async"),
                    resumed = fresh_dir("async-ref-resumed");
  const std::string common = "--set train.steps=6 --set checkpoint.every=2 --set checkpoint.keep_last=0";
  auto r = run_keel("train " + args(common) + " --run-dir " + sync);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train " + args(common + " --set checkpoint.async=true") + " --run-dir " + async);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("in the background: training stalled"), std::string::npos) << r.output;

  for (const char* column : {"/train/loss", "/train/grad_norm"}) {
    EXPECT_EQ(MetricsReader(sync + "/metrics.h5").read_double(column),
              MetricsReader(async + "/metrics.h5").read_double(column))
        << column;
  }
  const auto valid = CheckpointStore(async + "/checkpoints").list_valid();
  ASSERT_EQ(valid.size(), 3u);
  EXPECT_EQ(read_small_file(async + "/checkpoints/latest"), "step-00000006\n");
  EXPECT_TRUE(tmp_dirs(async).empty());
  for (int64_t step : {2, 4, 6}) {
    const std::string name = step_dir_name(step);
    const std::string what = "step " + std::to_string(step);
    const TrainingState a = read_rank_file(sync + "/checkpoints/" + name + "/rank-00000.h5");
    const TrainingState b = read_rank_file(async + "/checkpoints/" + name + "/rank-00000.h5");
    // Every tensor and state byte for byte; only the config (checkpoint.async) and the lineage (run id) differ.
    expect_same_bytes(a.model, b.model, what + " weights");
    expect_same_bytes(a.optimizer, b.optimizer, what + " optimizer state");
    expect_same_bytes({{"cpu", a.cpu_rng}}, {{"cpu", b.cpu_rng}}, what + " RNG");
    EXPECT_EQ(a.step, b.step);
    EXPECT_EQ(a.tokens_seen, b.tokens_seen) << what;
    EXPECT_EQ(a.optimizer_name, b.optimizer_name) << what;
    EXPECT_EQ(a.optimizer_step, b.optimizer_step) << what;
    EXPECT_EQ(a.optimizer_json, b.optimizer_json) << what;
    EXPECT_EQ(a.lr_schedule, b.lr_schedule) << what;
    EXPECT_EQ(a.data_ledger, b.data_ledger) << what;
    ASSERT_EQ(a.plugins.size(), b.plugins.size()) << what;
    for (size_t i = 0; i < a.plugins.size(); ++i) {
      EXPECT_EQ(a.plugins[i].json, b.plugins[i].json) << what << " plugin " << a.plugins[i].name;
      expect_same_bytes(a.plugins[i].tensors, b.plugins[i].tensors, what + " plugin " + a.plugins[i].name);
    }
    EXPECT_NE(b.config_ini.find("\nasync = true\n"), std::string::npos) << b.config_ini;
    EXPECT_EQ(a.config_ini.find("async"), std::string::npos) << "a default key is not written";
    EXPECT_EQ(without_async_line(b.config_ini), a.config_ini) << what;
  }
  int background_events = 0;
  for (const auto& e : MetricsReader(async + "/metrics.h5").read_events()) {
    if (e.kind == "checkpoint" && e.text.find("in the background") != std::string::npos) ++background_events;
  }
  EXPECT_EQ(background_events, 2) << "steps 2 and 4 in the background, the end-of-run save synchronously";

  // An asynchronous checkpoint resumes like any other: to the same final weights as the synchronous run.
  r = run_keel("resume --from " + async + "/checkpoints/step-00000004 --run-dir " + resumed);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_bytes(read_rank_file(sync + "/checkpoints/step-00000006/rank-00000.h5").model,
                    read_rank_file(resumed + "/checkpoints/step-00000006/rank-00000.h5").model, "resumed weights");
  for (const auto& dir : {sync, async, resumed}) fs::remove_all(dir);
}

TEST(AsyncCheckpoint, SigkillDuringBackgroundSavesLeavesTheNewestCommittedOneValid) {
  std::mt19937 rng(20261203);
  for (int round = 0; round < 3; ++round) {
    const std::string run = fresh_dir("async-kill-" + std::to_string(round));
    // A background save every step: one is nearly always in flight when the kill lands.
    kill_train_after_first_checkpoint(run,
                                      "--set train.steps=100000 --set checkpoint.every=1 --set checkpoint.keep_last=2 "
                                      "--set checkpoint.async=true",
                                      rng);

    const ResolvedCheckpoint ckpt = resolve_checkpoint(run);  // throws if nothing valid
    EXPECT_EQ(ckpt.dir.find(".tmp"), std::string::npos);
    const TrainingState state = read_rank_file(ckpt.dir + "/rank-00000.h5");
    EXPECT_EQ(state.step, ckpt.manifest.step);
    EXPECT_LE(CheckpointStore(run + "/checkpoints").list_valid().size(), 3u);
    if (round == 0) {
      const std::string resumed = fresh_dir("async-kill-resumed");
      auto r = run_keel("resume --from " + run + " --run-dir " + resumed +
                        " --set train.steps=" + std::to_string(state.step + 3));
      EXPECT_EQ(r.exit_code, 0) << r.output;
      EXPECT_TRUE(resolve_checkpoint(resumed).manifest.step == state.step + 3);
      fs::remove_all(resumed);
    }
    fs::remove_all(run);
  }
}

TEST(AsyncCheckpoint, StopSignalWaitsForTheSaveInFlight) {
  const std::string run = fresh_dir("async-term");
  const pid_t pid = spawn_train(run,
                                "--set train.steps=100000 --set checkpoint.every=1 --set checkpoint.async=true "
                                "--set metrics.flush_every=1");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (readable_rows(run + "/metrics.h5") < 5 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // The stop checkpoint holds every step run, the one in flight before it was committed, and nothing is left half
  // written.
  const ResolvedCheckpoint ckpt = resolve_checkpoint(run);
  EXPECT_TRUE(ckpt.warnings.empty()) << ckpt.warnings.front();
  EXPECT_EQ(static_cast<size_t>(ckpt.manifest.step),
            MetricsReader(run + "/metrics.h5").read_int64("/train/step").size());
  EXPECT_TRUE(tmp_dirs(run).empty());
  const auto valid = CheckpointStore(run + "/checkpoints").list_valid();
  ASSERT_GE(valid.size(), 2u);
  EXPECT_EQ(valid[valid.size() - 2].step, ckpt.manifest.step - 1) << "the background save of the step before";
  fs::remove_all(run);
}

TEST(AsyncCheckpoint, BackgroundWriteFailureStopsTheRunNamingTheCheckpointAndRank) {
  const std::string run = fresh_dir("async-fail");
  const auto r =
      run_keel_with_env("KEEL_TEST_FAULT=save_fail:0:4",
                        "train " + args("--set train.steps=8 --set checkpoint.every=2 --set checkpoint.async=true") +
                            " --run-dir " + run);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint step 4 was not committed by any rank: rank 0 (dp 0, tp 0, pp 0) could not "
                          "write its file: " +
                          run +
                          "/checkpoints/step-00000004.tmp/rank-00000.h5: injected failure (KEEL_TEST_FAULT); "
                          "the latest checkpoint is still " +
                          run + "/checkpoints/step-00000002"),
            std::string::npos)
      << r.output;
  expect_only_checkpoint(run, /*kept_step=*/2, /*failed_step=*/4);
  fs::remove_all(run);
}

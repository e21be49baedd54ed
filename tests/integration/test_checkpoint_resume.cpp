// Why: the checkpoint promises, end to end through the `keel` binary: resume without changes is bit-exact
// (losses, grad norms, per-tensor norms, weights, optimizer state, RNG, data ledger) in fp32 and bf16-mixed;
// SIGKILL during saves never leaves a loadable half-checkpoint; damage is named and, from a run dir, passed over;
// model and data mismatches are refused before anything is written; SIGTERM saves and resumes exactly; a
// branch records what changed.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "../common/damage.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/training_state.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using namespace keel::checkpoint;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

std::string base_args(const std::string& extra = "") {
  return "--config " + tiny_config() + " " + test_data_override() + " --set optim.decay_steps=20 " + extra;
}

void expect_same_tensors(const NamedTensors& a, const NamedTensors& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, tensor] : a) {
    bool found = false;
    for (const auto& [n, t] : b) {
      if (n != name) continue;
      found = true;
      EXPECT_TRUE(torch::equal(t, tensor)) << what << " " << name << " differs";
    }
    EXPECT_TRUE(found) << what << " " << name << " missing";
  }
}

// Rows [from, to) of a metrics column.
std::vector<double> rows(const std::string& run_dir, const std::string& column, size_t from, size_t to) {
  const auto all = MetricsReader(run_dir + "/metrics.h5").read_double(column);
  return std::vector<double>(all.begin() + static_cast<std::ptrdiff_t>(from),
                             all.begin() + static_cast<std::ptrdiff_t>(to));
}

}  // namespace

class BitExactResume : public ::testing::TestWithParam<std::string> {};

TEST_P(BitExactResume, TwentyStepsEqualTenPlusResumeTen) {
  const std::string precision = "--set train.precision=" + GetParam();
  const std::string straight = fresh_dir("straight-" + GetParam()), first = fresh_dir("first-" + GetParam()),
                    second = fresh_dir("second-" + GetParam());
  auto r = run_keel("train " + base_args(precision) + " --set train.steps=20 --run-dir " + straight);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train " + base_args(precision) + " --set train.steps=10 --run-dir " + first);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + first + " --run-dir " + second + " --set train.steps=20");
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // Metrics: the resumed run holds exactly steps 10..19, equal to the straight run's.
  EXPECT_EQ(MetricsReader(second + "/metrics.h5").read_int64("/train/step"),
            (std::vector<int64_t>{10, 11, 12, 13, 14, 15, 16, 17, 18, 19}));
  for (const char* column : {"/train/loss", "/train/grad_norm", "/train/lr"})
    EXPECT_EQ(rows(straight, column, 10, 20), rows(second, column, 0, 10)) << column;
  const auto straight_norms = MetricsReader(straight + "/metrics.h5").read_matrix("/train/tensor/grad_norm");
  const auto resumed_norms = MetricsReader(second + "/metrics.h5").read_matrix("/train/tensor/grad_norm");
  ASSERT_EQ(resumed_norms.rows, 10);
  ASSERT_EQ(straight_norms.cols, resumed_norms.cols);
  for (size_t i = 0; i < resumed_norms.values.size(); ++i)
    ASSERT_EQ(straight_norms.values[static_cast<size_t>(10 * straight_norms.cols) + i], resumed_norms.values[i])
        << "per-tensor grad norm " << i;

  // The final state: weights, optimizer moments and step, RNG, tokens, data ledger.
  const TrainingState a = read_rank_file(straight + "/checkpoints/step-00000020/rank-00000.h5");
  const TrainingState b = read_rank_file(second + "/checkpoints/step-00000020/rank-00000.h5");
  expect_same_tensors(a.model, b.model, "weights");
  expect_same_tensors(a.optimizer, b.optimizer, "optimizer state");
  EXPECT_EQ(a.optimizer_step, b.optimizer_step);
  EXPECT_TRUE(torch::equal(a.cpu_rng, b.cpu_rng));
  EXPECT_EQ(a.tokens_seen, b.tokens_seen);
  EXPECT_EQ(nlohmann::json::parse(a.data_ledger), nlohmann::json::parse(b.data_ledger));
  EXPECT_EQ(a.lr_schedule, b.lr_schedule);

  const Lineage lineage = parse_lineage(read_small_file(second + "/lineage.json"), "lineage.json");
  EXPECT_EQ(lineage.kind(), "continuation");
  EXPECT_EQ(lineage.parent_step, 10);
  EXPECT_EQ(lineage.parent_run_dir, first);
}

INSTANTIATE_TEST_SUITE_P(Precisions, BitExactResume, ::testing::Values("fp32", "bf16-mixed"), [](const auto& info) {
  return info.param == "fp32" ? std::string("fp32") : std::string("bf16");
});

TEST(CheckpointSaves, SigkillDuringSavesNeverLeavesALoadableHalfCheckpoint) {
  std::mt19937 rng(20261122);
  for (int round = 0; round < 4; ++round) {
    const std::string run = fresh_dir("kill-save-" + std::to_string(round));
    // A checkpoint every step: most of the wall time is spent inside a save.
    kill_train_after_first_checkpoint(
        run, "--set train.steps=100000 --set checkpoint.every=1 --set checkpoint.keep_last=2", rng);

    const ResolvedCheckpoint ckpt = resolve_checkpoint(run);  // throws if nothing valid
    EXPECT_EQ(ckpt.dir.find(".tmp"), std::string::npos);
    EXPECT_TRUE(ckpt.warnings.empty()) << ckpt.warnings.front();
    const TrainingState state = read_rank_file(ckpt.dir + "/rank-00000.h5");
    EXPECT_EQ(state.step, ckpt.manifest.step);
    // Retention held at the moment of the kill: at most K valid checkpoints (+1 mid-prune).
    EXPECT_LE(CheckpointStore(run + "/checkpoints").list_valid().size(), 3u);
    if (round == 0) {
      const std::string resumed = fresh_dir("kill-save-resumed");
      auto r = run_keel("resume --from " + run + " --run-dir " + resumed +
                        " --set train.steps=" + std::to_string(state.step + 2));
      EXPECT_EQ(r.exit_code, 0) << r.output;
    }
  }
}

TEST(CheckpointSaves, RetentionInARealRun) {
  const std::string run = fresh_dir("retention");
  auto r = run_keel("train " +
                    base_args("--set train.steps=10 --set checkpoint.every=1 --set checkpoint.keep_last=2 "
                              "--set checkpoint.milestone_every=4") +
                    " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<int64_t> steps;
  for (const auto& e : CheckpointStore(run + "/checkpoints").list()) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<int64_t>{4, 8, 9, 10}));
  EXPECT_EQ(read_small_file(run + "/checkpoints/latest"), "step-00000010\n");
}

TEST(CheckpointResume, DamageIsNamedAndRunDirFallsBackToTheNewestValid) {
  const std::string run = fresh_dir("damage");
  auto r = run_keel("train " + base_args("--set train.steps=10 --set checkpoint.every=5") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  keel::testing::flip_byte(run + "/checkpoints/step-00000010/rank-00000.h5", 4096, 0x01);

  const std::string refused = fresh_dir("damage-refused");
  r = run_keel("resume --from " + run + "/checkpoints/step-00000010 --run-dir " + refused);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("step-00000010/rank-00000.h5: corrupted"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(refused));

  const std::string fallback = fresh_dir("damage-fallback");
  r = run_keel("resume --from " + run + " --run-dir " + fallback + " --set train.steps=12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: skipped damaged checkpoint"), std::string::npos) << r.output;
  const Lineage lineage = parse_lineage(read_small_file(fallback + "/lineage.json"), "lineage.json");
  EXPECT_EQ(lineage.parent_step, 5);
  ASSERT_FALSE(lineage.notes.empty());
  EXPECT_NE(lineage.notes[0].find("step-00000010/rank-00000.h5: corrupted"), std::string::npos);

  fs::resize_file(run + "/checkpoints/step-00000005/rank-00000.h5", 1000);
  r = run_keel("resume --from " + run + " --run-dir " + fresh_dir("damage-none"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("no valid checkpoint (refusing to start from step 0)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step-00000005/rank-00000.h5: truncated"), std::string::npos) << r.output;
}

TEST(CheckpointResume, ModelChangesAreRefusedBeforeAnythingIsWritten) {
  const std::string run = fresh_dir("shape");
  auto r = run_keel("train " + base_args("--set train.steps=2") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string target = fresh_dir("shape-target");
  r = run_keel("resume --from " + run + " --run-dir " + target + " --set model.d_model=128");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("model.d_model differs: checkpoint 64, requested 128"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(target));
  r = run_keel("resume --from " + run + " --run-dir " + target + " --set 'train.batch_schedule=0:16;1:12'");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("train.batch_schedule: the global batch from step 1 (12) must be divisible"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(target));
  r = run_keel("resume --from " + run + " --run-dir " + run + " --force");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("contains the checkpoint being resumed"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step-00000002/manifest.json"));
}

TEST(CheckpointResume, DataChangesNeedAFlagAndTokenizerChangesAreRefused) {
  const std::string run = fresh_dir("datachange");
  auto r = run_keel("train " + base_args("--set train.steps=2") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Other prepared data with the same tokenizer: a copy whose prepared fingerprint differs.
  const std::string data = fresh_dir("datachange-data");
  fs::copy(KEEL_TEST_DATA_DIR, data, fs::copy_options::recursive);
  nlohmann::json prepared = nlohmann::json::parse(read_small_file(data + "/prepared.json"));
  prepared["fingerprint"] = "0000000000000000";
  std::ofstream(data + "/prepared.json") << prepared.dump(2);

  const std::string refused = fresh_dir("datachange-refused");
  r = run_keel("resume --from " + run + " --run-dir " + refused + " --set data.dir=" + data + " --set train.steps=3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("data prepared: checkpoint"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--allow-data-change"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(refused));

  const std::string allowed = fresh_dir("datachange-allowed");
  r = run_keel("resume --from " + run + " --run-dir " + allowed + " --set data.dir=" + data +
               " --set train.steps=3 --allow-data-change");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Lineage lineage = parse_lineage(read_small_file(allowed + "/lineage.json"), "lineage.json");
  EXPECT_TRUE(lineage.data_change_allowed);
  EXPECT_EQ(lineage.kind(), "branch");

  prepared["tokenizer"]["fingerprint"] = "ffffffffffffffff";
  std::ofstream(data + "/prepared.json") << prepared.dump(2);
  r = run_keel("resume --from " + run + " --run-dir " + refused + " --set data.dir=" + data + " --allow-data-change");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("data tokenizer: checkpoint"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(refused));
}

TEST(CheckpointResume, SigtermSavesExitsZeroAndResumesExactly) {
  const std::string straight = fresh_dir("term-straight"), stopped = fresh_dir("term-stopped"),
                    resumed = fresh_dir("term-resumed");
  const std::string args = "--set train.steps=60 --set optim.decay_steps=60 --set metrics.flush_every=1";
  auto r = run_keel("train " + base_args(args) + " --run-dir " + straight);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  const pid_t pid = spawn_keel("train " + base_args(args) + " --run-dir " + stopped);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (readable_rows(stopped + "/metrics.h5") < 5 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  const ResolvedCheckpoint ckpt = resolve_checkpoint(stopped);
  const int64_t k = ckpt.manifest.step;
  ASSERT_GE(k, 5);
  ASSERT_LT(k, 60) << "the run finished before the signal; the test needs it mid-run";
  EXPECT_EQ(MetricsReader(stopped + "/metrics.h5").read_int64("/train/step").size(), static_cast<size_t>(k));

  r = run_keel("resume --from " + stopped + " --run-dir " + resumed);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* column : {"/train/loss", "/train/grad_norm"})
    EXPECT_EQ(rows(straight, column, static_cast<size_t>(k), 60), rows(resumed, column, 0, static_cast<size_t>(60 - k)))
        << column;
}

TEST(CheckpointResume, BranchRecordsItsChangesAndInspectDrawsTheTree) {
  const std::string base = fresh_dir("tree-base"), branch = fresh_dir("tree-branch");
  auto r = run_keel("train " + base_args("--set train.steps=4 --set checkpoint.every=2") + " --run-dir " + base);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + base + "/checkpoints/step-00000002 --run-dir " + branch +
               " --set optim.lr=0.001 --set data.mixture=prose=0.2,code=0.8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("inspect " + base + " " + branch);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("└── " + branch), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("branch from step 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("optim.lr: 0.003 -> 0.001"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("data: mixture from step 2: prose=0.2,code=0.8"), std::string::npos) << r.output;
  r = run_keel("inspect " + base + "/checkpoints/step-00000004");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("verified"), std::string::npos);
  EXPECT_NE(r.output.find("embed.weight  float32 [2048, 64]"), std::string::npos) << r.output;
}

TEST(CheckpointFormat, H5pyReadsACheckpointWithoutKeelCode) {
  const std::string run = fresh_dir("h5py");
  auto r = run_keel("train " + base_args("--set train.steps=2") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Debian's interpreter, where python3-h5py (scripts/setup.sh) lives.
  const std::string command = std::string("/usr/bin/python3 ") + KEEL_SOURCE_DIR +
                              "/tests/integration/read_checkpoint_h5py.py " + run + "/checkpoints/step-00000002 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  size_t n = 0;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, n);
  const int status = pclose(pipe);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << output;
  EXPECT_NE(output.find("step 2,"), std::string::npos) << output;
  EXPECT_NE(output.find("embed.weight float32 (2048, 64)"), std::string::npos) << output;
  EXPECT_NE(output.find("optimizer: adamw step 2"), std::string::npos) << output;
  EXPECT_NE(output.find("kind root"), std::string::npos) << output;
}

// Why: plugins in real runs through the `keel` binary: every kind of broken plugin is refused with a clear
// message before the run dir is claimed; a reproducible loss spike (the lr_spike fixture) is caught by
// zscore_skip, which leaves the weights of that step bitwise unchanged, and by rollback_skip, which rolls back
// and skips the data; plugin state survives save/resume bit-exactly; and a swap from a checkpoint
// (`keel resume --plugin`) is bit-exact with the same swap made mid-run by `keel control ... --at-step`.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <thread>

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

std::vector<std::string> event_kinds_at(const std::string& run, int64_t step) {
  std::vector<std::string> out;
  for (const auto& e : MetricsReader(run + "/metrics.h5").read_events()) {
    if (e.step == step) out.push_back(e.kind);
  }
  return out;
}
bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

TEST(Plugins, BrokenOrWrongPluginsAreRefusedBeforeTheRunDirIsClaimed) {
  const std::string run = fresh_dir("plugin-refused");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--plugin spike_handler=" + fixture_plugin("bad_api_version"),
       "built for plugin API version 999, this Keel speaks version 3"},
      {"--plugin observers=" + fixture_plugin("bad_fingerprint"), "built with a different toolchain"},
      {"--plugin observers=" + fixture_plugin("bad_fingerprint"), "LibTorch 0.4.1"},
      {"--plugin observers=" + fixture_plugin("no_entry_point"),
       "not a Keel plugin (it does not export keel_plugin_info)"},
      {"--plugin observers=/no/such/plugin.so", "/no/such/plugin.so: no such file"},
      {"--plugin spike_handler=no_such_builtin", "no plugin named 'no_such_builtin'"},
      {"--plugin spike_handler=adamw", "fills optimizer, not spike_handler"},
      {"--plugin warp_drive=adamw", "unknown plugin slot 'warp_drive'"},
      {"--plugin optimizer=adamw --plugin-arg adamw.betaa1=0.9", "unknown plugin argument 'betaa1'"},
  };
  for (const auto& [flags, message] : cases) {
    const auto r = run_keel("train " + tiny_args() + " --run-dir " + run + " " + flags);
    EXPECT_NE(r.exit_code, 0) << flags;
    EXPECT_NE(r.output.find(message), std::string::npos) << flags << "\n" << r.output;
    EXPECT_EQ(r.output.find("Segmentation"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(run)) << flags;
  }
}

TEST(Plugins, ZscoreSkipSkipsExactlyTheSpikeAndLeavesWeightsUnchanged) {
  const std::string run = fresh_dir("zscore-run");
  // lr_spike multiplies the LR at step 12, so the loss of step 13 jumps.
  const auto r = run_keel("train " + tiny_args("--set train.steps=16") + " --run-dir " + run +
                          " --plugin lr_schedule=" + fixture_plugin("lr_spike") +
                          " --plugin spike_handler=zscore_skip --plugin-arg zscore_skip.threshold=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  MetricsReader reader(run + "/metrics.h5");
  const auto skipped = reader.read_int64("/train/skipped");
  const auto loss = reader.read_double("/train/loss");
  ASSERT_EQ(skipped.size(), 16u);
  EXPECT_EQ(skipped[13], 1) << "loss 12 " << loss[12] << ", 13 " << loss[13];
  for (size_t i = 0; i < 13; ++i) EXPECT_EQ(skipped[i], 0) << "step " << i;
  EXPECT_TRUE(has(event_kinds_at(run, 13), "skip"));
  // Per-tensor param norms are those of the weights each step's forward used: the skipped update of step 13
  // leaves step 14's bitwise equal to step 13's, while an applied update (step 12) changes them.
  const auto norms = reader.read_matrix("/train/tensor/param_norm");
  for (int64_t col = 0; col < norms.cols; ++col) EXPECT_EQ(norms.at(13, col), norms.at(14, col)) << "tensor " << col;
  bool changed = false;
  for (int64_t col = 0; col < norms.cols; ++col) changed = changed || norms.at(12, col) != norms.at(13, col);
  EXPECT_TRUE(changed) << "the update of step 12 left every param norm unchanged";
}

TEST(Plugins, RollbackSkipReturnsToTheCheckpointAndSkipsTheData) {
  const std::string run = fresh_dir("rollback-run");
  const auto r = run_keel("train " + tiny_args("--set train.steps=16 --set checkpoint.every=4") + " --run-dir " + run +
                          " --plugin lr_schedule=" + fixture_plugin("lr_spike") +
                          " --plugin spike_handler=rollback_skip --plugin-arg rollback_skip.threshold=4 --plugin-arg "
                          "rollback_skip.skip=samples");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  MetricsReader reader(run + "/metrics.h5");
  const auto steps = reader.read_int64("/train/step");
  const auto loss = reader.read_double("/train/loss");
  int rollbacks = 0;
  for (const auto& e : reader.read_events()) {
    if (e.kind != "rollback") continue;
    ++rollbacks;
    EXPECT_EQ(e.step, 13);
    EXPECT_EQ(e.text.rfind("step 13 -> checkpoint step 12; skip ", 0), 0u) << e.text;
  }
  EXPECT_EQ(rollbacks, 1) << r.output;
  // Rows: steps 0..13 (13 rolled back), then the replay 12..15 with the fault gone and the data skipped.
  ASSERT_EQ(steps.size(), 18u);
  EXPECT_EQ(steps[14], 12);
  EXPECT_EQ(steps.back(), 15);
  EXPECT_GT(loss[13], 2 * loss[11]) << "the spike";
  for (size_t i = 14; i < loss.size(); ++i) EXPECT_LT(loss[i], 1.2 * loss[11]) << "recovered, row " << i;
  const Lineage lineage = parse_lineage(read_small_file(run + "/lineage.json"), "lineage.json");
  ASSERT_FALSE(lineage.notes.empty());
  EXPECT_NE(lineage.notes.back().find("rollback:"), std::string::npos);
}

TEST(Plugins, PluginStateSurvivesSaveAndResumeBitExactly) {
  const std::string straight = fresh_dir("pstate-straight"), first = fresh_dir("pstate-first"),
                    second = fresh_dir("pstate-second");
  const std::string plugins = " --plugin spike_handler=zscore_skip --plugin-arg zscore_skip.min_history=3";
  auto r = run_keel("train " + tiny_args("--set train.steps=20") + " --run-dir " + straight + plugins);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train " + tiny_args("--set train.steps=10") + " --run-dir " + first + plugins);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + first + " --run-dir " + second + " --set train.steps=20");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const TrainingState a = read_rank_file(straight + "/checkpoints/step-00000020/rank-00000.h5");
  const TrainingState b = read_rank_file(second + "/checkpoints/step-00000020/rank-00000.h5");
  ASSERT_EQ(a.plugins.size(), 1u);
  ASSERT_EQ(b.plugins.size(), 1u);
  EXPECT_EQ(a.plugins[0].name, "zscore_skip");
  EXPECT_EQ(a.plugins[0].json, b.plugins[0].json);
  ASSERT_EQ(a.plugins[0].tensors.size(), b.plugins[0].tensors.size());
  for (size_t i = 0; i < a.plugins[0].tensors.size(); ++i)
    EXPECT_TRUE(torch::equal(a.plugins[0].tensors[i].second, b.plugins[0].tensors[i].second))
        << a.plugins[0].tensors[i].first;
  EXPECT_EQ(MetricsReader(straight + "/metrics.h5").read_double("/train/loss").back(),
            MetricsReader(second + "/metrics.h5").read_double("/train/loss").back());
}

TEST(Plugins, SwapFromACheckpointEqualsTheSameSwapMidRun) {
  // Arm A: 10 steps, checkpoint at 5; arm B resumes from step 5 with lion + embedding_grad_shrink.
  const std::string a = fresh_dir("swap-a"), b = fresh_dir("swap-b"), c = fresh_dir("swap-c");
  auto r = run_keel("train " + tiny_args("--set train.steps=10 --set checkpoint.every=5") + " --run-dir " + a);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + a + "/checkpoints/step-00000005 --run-dir " + b +
               " --plugin optimizer=lion --plugin grad_transform=embedding_grad_shrink");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Lineage lineage = parse_lineage(read_small_file(b + "/lineage.json"), "lineage.json");
  EXPECT_EQ(lineage.kind(), "branch");
  bool optimizer_change = false;
  for (const auto& ch : lineage.changes) optimizer_change |= ch.key == "plugins.optimizer" && ch.to == "lion";
  EXPECT_TRUE(optimizer_change);

  // Arm C: the same run, with both swaps requested through `keel control` for the boundary before step 5. The
  // trainer is paused (SIGSTOP) while the requests are written, so they are in place long before step 5.
  const pid_t pid =
      spawn_keel("train " + tiny_args("--set train.steps=10 --set checkpoint.every=5") + " --run-dir " + c);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(c + "/metrics.h5") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  auto ctl = run_keel("control " + c + " swap optimizer=lion --at-step 5");
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  ctl = run_keel("control " + c + " swap grad_transform=embedding_grad_shrink --at-step 5");
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const auto kinds = event_kinds_at(c, 5);
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "plugin_swap"), 2) << "both swaps applied before step 5";
  EXPECT_EQ(MetricsReader(c + "/metrics.h5").read_int64("/train/step").size(), 10u);

  const auto loss_b = MetricsReader(b + "/metrics.h5").read_double("/train/loss");
  const auto loss_c = MetricsReader(c + "/metrics.h5").read_double("/train/loss");
  ASSERT_EQ(loss_b.size(), 5u);
  ASSERT_EQ(loss_c.size(), 10u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(loss_b[i], loss_c[5 + i]) << "step " << 5 + i;
  const TrainingState sb = read_rank_file(b + "/checkpoints/step-00000010/rank-00000.h5");
  const TrainingState sc = read_rank_file(c + "/checkpoints/step-00000010/rank-00000.h5");
  EXPECT_EQ(sb.optimizer_name, "lion");
  for (size_t i = 0; i < sb.model.size(); ++i) {
    for (const auto& [name, t] : sc.model) {
      if (name == sb.model[i].first) {
        EXPECT_TRUE(torch::equal(t, sb.model[i].second)) << name;
      }
    }
  }
}

TEST(Plugins, ListingShowsTheBuiltinsAndTheirSlots) {
  const auto r = run_keel("plugins");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* line : {"adamw 1.0  [optimizer]", "lion", "zscore_skip", "rollback_skip", "lr_cooldown",
                           "embedding_grad_shrink", "update_clip", "static", "staged", "linear_ramp"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
}

// Why: optimizer-state surgery and a new optimizer are only trustworthy end to end: through the `keel` binary on the
// tiny config, moment_surgery must change exactly the matched optimizer moments by exactly the factor (compared
// through two checkpoints), be on record (event, lineage), and a resumed branch must continue bit-exactly without
// repeating it; muon must lower the loss, give the same bits twice, resume bit-exactly, adopt AdamW's moments at a
// resume, and run under tensor parallelism; a rollback applies the surgery after the reload; bad arguments stop the
// run before the run dir is claimed.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

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

std::string rank0(const std::string& run, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return run + "/checkpoints/" + name + "/rank-00000.h5";
}

std::vector<double> losses(const std::string& run) {
  return MetricsReader(run + "/metrics.h5").read_double("/train/loss");
}

std::vector<std::string> events_of_kind(const std::string& run, const std::string& kind) {
  std::vector<std::string> out;
  for (const auto& e : MetricsReader(run + "/metrics.h5").read_events())
    if (e.kind == kind) out.push_back(std::to_string(e.step) + ": " + e.text);
  return out;
}

// The base run every test branches from: 4 adamw steps, checkpoint at 4, trained once per test binary.
const std::string& base_run() {
  static const std::string run = [] {
    const std::string dir = fresh_dir("optplug-base");
    const auto r = run_keel("train " + tiny_args("--set train.steps=4 --set checkpoint.every=4") + " --run-dir " + dir);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return dir;
  }();
  return run;
}

// The moment_surgery of these tests (blocks.0.attn.* and head.weight: first x 0.5, second reset) between a parent's
// rank file and its branch's, one skipped step later: exactly the matched moments changed; returns how many.
int expect_surgery_applied(const TrainingState& before, const TrainingState& after) {
  EXPECT_EQ(before.optimizer.size(), after.optimizer.size());
  int scaled = 0;
  if (before.optimizer.size() != after.optimizer.size()) return -1;
  for (size_t i = 0; i < before.optimizer.size(); ++i) {
    const auto& [name, t] = before.optimizer[i];
    EXPECT_EQ(after.optimizer[i].first, name);
    const torch::Tensor& now = after.optimizer[i].second;
    const bool matched = name.rfind("blocks.0.attn.", 0) == 0 || name.rfind("head.weight/", 0) == 0;
    const bool first = name.size() > 8 && name.substr(name.size() - 8) == "/exp_avg";
    if (!matched) {
      EXPECT_TRUE(torch::equal(now, t)) << name << " is not matched and must be unchanged";
      continue;
    }
    ++scaled;
    EXPECT_TRUE(torch::equal(now, first ? t.mul(0.5) : torch::zeros_like(t))) << name;
    EXPECT_FALSE(torch::equal(t, torch::zeros_like(t))) << name << ": the parent's moment should not be zero";
  }
  return scaled;
}

}  // namespace

TEST(MomentSurgeryRun, ScalesExactlyTheMatchedMomentsAndIsOnRecord) {
  // at = resume with action = skip: the surgery is applied at step 4 and that step's update is skipped, so the
  // optimizer state of step-5 is the parent's step-4 state with exactly the surgery applied.
  const std::string run = fresh_dir("surgery-exact");
  const auto r = run_keel("resume --from " + base_run() + "/checkpoints/step-00000004 --run-dir " + run +
                          " --set train.steps=5 --plugin spike_handler=moment_surgery --plugin-arg "
                          "moment_surgery.pattern=blocks.0.attn.*,head.weight --plugin-arg moment_surgery.first=0.5 "
                          "--plugin-arg moment_surgery.second=0 --plugin-arg moment_surgery.action=skip");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const TrainingState before = read_rank_file(rank0(base_run(), 4));
  const TrainingState after = read_rank_file(rank0(run, 5));
  const int scaled = expect_surgery_applied(before, after);
  EXPECT_GT(scaled, 4);
  EXPECT_EQ(after.optimizer_json, before.optimizer_json) << "the step count is not touched (a skipped update)";
  for (size_t i = 0; i < before.model.size(); ++i)
    EXPECT_TRUE(torch::equal(before.model[i].second, after.model[i].second)) << before.model[i].first;

  const auto events = events_of_kind(run, "moment_scales");
  ASSERT_EQ(events.size(), 1u);
  EXPECT_NE(events[0].find("4: moment scales 'blocks.0.attn.*:0.5:0;head.weight:0.5:0' (by moment_surgery) on "
                           "optimizer adamw: blocks.0.attn.* "),
            std::string::npos)
      << events[0];
  EXPECT_EQ(events_of_kind(run, "skip").size(), 1u);
  const Lineage lineage = parse_lineage(read_small_file(run + "/lineage.json"), "lineage.json");
  bool noted = false;
  for (const auto& note : lineage.notes) noted = noted || note.find("step 4: moment scales '") == 0;
  EXPECT_TRUE(noted);
}

// Sharding: under ZeRO-1 each DP rank holds its share of the optimizer state, and the surgery reaches every share.
TEST(MomentSurgeryRun, EveryZeroOneRankScalesItsShareOfTheMoments) {
  const std::string parent = fresh_dir("surgery-zero1-parent"), run = fresh_dir("surgery-zero1");
  const std::string launch = "launch --nproc 2 -- " + std::string(KEEL_BINARY);
  auto r =
      run_keel(launch + " train " +
               tiny_args("--set train.steps=4 --set checkpoint.every=4 --set parallel.dp=2 --set parallel.zero=1") +
               " --run-dir " + parent);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel(launch + " resume --from " + parent + "/checkpoints/step-00000004 --run-dir " + run +
               " --set train.steps=5 --plugin spike_handler=moment_surgery --plugin-arg "
               "moment_surgery.pattern=blocks.0.attn.*,head.weight --plugin-arg moment_surgery.first=0.5 "
               "--plugin-arg moment_surgery.second=0 --plugin-arg moment_surgery.action=skip");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  int scaled = 0;
  size_t tensors = 0;
  for (const std::string rank : {"rank-00000.h5", "rank-00001.h5"}) {
    const TrainingState before = read_rank_file(parent + "/checkpoints/step-00000004/" + rank);
    const TrainingState after = read_rank_file(run + "/checkpoints/step-00000005/" + rank);
    const int n = expect_surgery_applied(before, after);
    ASSERT_GE(n, 0) << rank << ": the optimizer state changed shape";
    scaled += n;
    tensors += before.optimizer.size();
  }
  EXPECT_GT(scaled, 4);
  EXPECT_EQ(tensors, read_rank_file(rank0(base_run(), 4)).optimizer.size()) << "the two shares make the whole state";
  fs::remove_all(parent);
  fs::remove_all(run);
}

TEST(MomentSurgeryRun, AResumedBranchContinuesBitExactlyWithoutRepeatingIt) {
  const std::string a = fresh_dir("surgery-a"), b = fresh_dir("surgery-b");
  const std::string surgery =
      " --plugin spike_handler=moment_surgery --plugin-arg moment_surgery.first=0 --plugin-arg moment_surgery.second=0";
  auto r = run_keel("resume --from " + base_run() + "/checkpoints/step-00000004 --run-dir " + a +
                    " --set train.steps=10 --set checkpoint.every=3" + surgery);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + a + "/checkpoints/step-00000006 --run-dir " + b + " --set train.steps=10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(events_of_kind(a, "moment_scales").size(), 1u);
  EXPECT_EQ(events_of_kind(b, "moment_scales").size(), 0u) << "the loaded state says it already fired";
  const auto la = losses(a), lb = losses(b);
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(la[2 + i], lb[i]) << "step " << 6 + i;
  const TrainingState sa = read_rank_file(rank0(a, 10)), sb = read_rank_file(rank0(b, 10));
  ASSERT_EQ(sa.plugins.size(), 1u);
  ASSERT_EQ(sb.plugins.size(), 1u);
  EXPECT_EQ(sa.plugins[0].json, "{\"fired\": 1, \"last_fired_step\": 4}");
  EXPECT_EQ(sa.plugins[0].json, sb.plugins[0].json);
  for (size_t i = 0; i < sa.optimizer.size(); ++i)
    EXPECT_TRUE(torch::equal(sa.optimizer[i].second, sb.optimizer[i].second)) << sa.optimizer[i].first;
}

TEST(MomentSurgeryRun, AtASpikeRollsBackAndAppliesTheSurgeryAfterTheReload) {
  // lr_spike multiplies the LR at step 12 once, so the loss of step 13 jumps; the handler rolls back to step 12
  // and Keel resets every moment after the reload.
  const std::string run = fresh_dir("surgery-rollback");
  const auto r = run_keel("train " + tiny_args("--set train.steps=16 --set checkpoint.every=4") + " --run-dir " + run +
                          " --plugin lr_schedule=" + fixture_plugin("lr_spike") +
                          " --plugin spike_handler=moment_surgery --plugin-arg moment_surgery.at=spike --plugin-arg "
                          "moment_surgery.threshold=4 --plugin-arg moment_surgery.action=rollback --plugin-arg "
                          "moment_surgery.first=0 --plugin-arg moment_surgery.second=0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto rollbacks = events_of_kind(run, "rollback");
  ASSERT_EQ(rollbacks.size(), 1u) << r.output;
  EXPECT_EQ(rollbacks[0].rfind("13: step 13 -> checkpoint step 12; moment scales '*:0:0' (by moment_surgery) on "
                               "optimizer adamw: * 21 of 21 tensors, exp_avg x0, exp_avg_sq x0",
                               0),
            0u)
      << rollbacks[0];
  EXPECT_TRUE(events_of_kind(run, "moment_scales").empty()) << "a rollback records the surgery in its own event";
  EXPECT_EQ(MetricsReader(run + "/metrics.h5").read_int64("/train/step").size(), 18u) << "steps 0..13, then 12..15";
  const Lineage lineage = parse_lineage(read_small_file(run + "/lineage.json"), "lineage.json");
  ASSERT_FALSE(lineage.notes.empty());
  EXPECT_NE(lineage.notes.back().find("rollback: step 13 -> checkpoint step 12; moment scales"), std::string::npos)
      << lineage.notes.back();
}

TEST(MuonRun, LowersTheLossGivesTheSameBitsTwiceAndResumesBitExactly) {
  // A 12-step run and a 6-step run of the same config: their first 6 steps must be the same bits (determinism), and
  // a resume of the short one to step 12 must reproduce the long one bit for bit.
  const std::string x = fresh_dir("muon-x"), first = fresh_dir("muon-first"), second = fresh_dir("muon-second");
  const std::string muon = " --plugin optimizer=muon";
  auto r = run_keel("train " + tiny_args("--set train.steps=12") + " --run-dir " + x + muon);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train " + tiny_args("--set train.steps=6") + " --run-dir " + first + muon);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + first + " --run-dir " + second + " --set train.steps=12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto lx = losses(x), l1 = losses(first), l2 = losses(second);
  ASSERT_EQ(lx.size(), 12u);
  ASSERT_EQ(l1.size(), 6u);
  ASSERT_EQ(l2.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(lx[i], l1[i]) << "two runs, the same bits: step " << i;
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(lx[6 + i], l2[i]) << "resumed: step " << 6 + i;
  EXPECT_LT(lx.back(), lx.front() - 0.2) << "muon lowers the loss";
  const TrainingState sx = read_rank_file(rank0(x, 12)), s2 = read_rank_file(rank0(second, 12));
  EXPECT_EQ(sx.optimizer_name, "muon");
  EXPECT_EQ(sx.optimizer_json, s2.optimizer_json);
  for (size_t i = 0; i < sx.model.size(); ++i)
    EXPECT_TRUE(torch::equal(sx.model[i].second, s2.model[i].second)) << sx.model[i].first;
  for (size_t i = 0; i < sx.optimizer.size(); ++i)
    EXPECT_TRUE(torch::equal(sx.optimizer[i].second, s2.optimizer[i].second)) << sx.optimizer[i].first;
}

TEST(MuonRun, AdoptsAdamWsMomentsAtAResume) {
  const std::string run = fresh_dir("muon-adopt");
  const auto r = run_keel("resume --from " + base_run() + "/checkpoints/step-00000004 --run-dir " + run +
                          " --set train.steps=6 --plugin optimizer=muon");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Lineage lineage = parse_lineage(read_small_file(run + "/lineage.json"), "lineage.json");
  std::string notes;
  for (const auto& note : lineage.notes) notes += note + "\n";
  EXPECT_NE(notes.find("optimizer adamw -> muon: muon: adopted exp_avg of 14/14 hidden matrices"), std::string::npos)
      << notes;
  for (double loss : losses(run)) EXPECT_TRUE(std::isfinite(loss));
}

TEST(MuonRun, RunsUnderTensorParallelism) {
  const std::string run = fresh_dir("muon-tp2");
  const auto r =
      run_keel("launch --nproc 2 -- " + std::string(KEEL_BINARY) + " train " +
               tiny_args("--set train.steps=8 --set parallel.tp=2") + " --run-dir " + run + " --plugin optimizer=muon");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto l = losses(run);
  ASSERT_EQ(l.size(), 8u);
  for (double loss : l) EXPECT_TRUE(std::isfinite(loss));
  EXPECT_LT(l.back(), l.front() - 0.1) << "per-shard Muon still lowers the loss";
}

TEST(OptimizerPluginsRun, BadArgumentsAreRefusedNamingPluginAndKey) {
  const std::string run = fresh_dir("optplug-refused");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--plugin optimizer=muon --plugin-arg muon.scale=spectral", "muon: argument 'scale' must be rms or shape"},
      {"--plugin optimizer=muon --plugin-arg muon.momentum=1.5", "muon: argument 'momentum'"},
      {"--plugin optimizer=muon --plugin-arg muon.nesterovv=true", "unknown plugin argument 'nesterovv'"},
      {"--plugin spike_handler=moment_surgery", "moment_surgery: arguments 'first' and 'second' are both 1"},
      {"--plugin spike_handler=moment_surgery --plugin-arg moment_surgery.first=-2",
       "moment_surgery: argument 'first'"},
      {"--plugin optimizer=lion --plugin spike_handler=moment_surgery --plugin-arg moment_surgery.second=0",
       "optimizer lion keeps none"},
  };
  for (const auto& [flags, message] : cases) {
    const auto r = run_keel("train " + tiny_args() + " --run-dir " + run + " " + flags);
    EXPECT_NE(r.exit_code, 0) << flags;
    EXPECT_NE(r.output.find(message), std::string::npos) << flags << "\n" << r.output;
    EXPECT_FALSE(fs::exists(run)) << flags;
  }
}

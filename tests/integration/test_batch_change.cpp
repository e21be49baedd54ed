// Why: the global batch may grow during a run (train.batch_schedule, batch-size warm-up) or change at a resume
// (`keel resume --set train.grad_accum=...`), and the data-order promise must survive it: the samples a run with
// a batch change trains on, concatenated from its recorded /data/batch rows, are exactly those a constant-batch
// run reads, none lost or repeated; the lineage records each change (step, old and new batch); the LR follows the
// optimizer step whatever the batch; `keel data show-batch --run` reconstructs the changed steps; and DP ranks
// split a changing batch as one process trains it. Tiny config, a few steps each.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using nlohmann::json;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

// tiny.ini: micro_batch 8 x grad_accum 2 = 16 sequences per step.
const std::string kCommon = " --set train.precision=fp32 --set metrics.per_tensor=false --set optim.decay_steps=8";

struct Sample {
  std::string source;
  int64_t sample_id;
  bool operator==(const Sample& o) const { return source == o.source && sample_id == o.sample_id; }
};

// The samples `run` trained on at steps [first, last], in step and slot order (its /data/batch rows).
std::vector<Sample> recorded(const std::string& run, int64_t first, int64_t last,
                             std::vector<size_t>* per_step = nullptr) {
  const MetricsReader reader(run + "/metrics.h5");
  const auto names = reader.batch_sources();
  std::vector<Sample> out;
  for (const auto& [step, rows] : reader.read_batches_by_step()) {
    if (step < first || step > last) continue;
    if (per_step) per_step->push_back(rows.size());
    for (const auto& row : rows) out.push_back({names.at(static_cast<size_t>(row.source)), row.sample_id});
  }
  return out;
}

// A constant-batch run of 6 steps (96 samples), trained once for the suite.
const std::string& constant_run() {
  static const std::string run = [] {
    const std::string dir = fresh_dir("batch-constant");
    const auto r = run_keel("train " + tiny_args("--set train.steps=6" + kCommon) + " --run-dir " + dir);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return dir;
  }();
  return run;
}

keel::checkpoint::Lineage lineage_of(const std::string& run) {
  return keel::checkpoint::parse_lineage(keel::checkpoint::read_small_file(run + "/lineage.json"), run);
}

}  // namespace

TEST(BatchChange, AWarmUpScheduleReadsTheConstantBatchStream) {
  const std::string run = fresh_dir("batch-warmup");
  const auto r = run_keel("train " + tiny_args("--set train.steps=4 --set 'train.batch_schedule=0:16;2:32'" + kCommon) +
                          " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<size_t> sizes;
  const std::vector<Sample> got = recorded(run, 0, 3, &sizes);
  EXPECT_EQ(sizes, (std::vector<size_t>{16, 16, 32, 32}));
  const std::vector<Sample> want = recorded(constant_run(), 0, 5);  // 6 x 16 = 96 = 16 + 16 + 32 + 32
  ASSERT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want) << "the warm-up run's samples are not the constant run's, in order";
  // Tokens follow the batch: both runs have consumed 96 x 64 tokens at their last step.
  EXPECT_EQ(MetricsReader(run + "/metrics.h5").read_int64("/train/tokens").back(), 96 * 64);
  // The lineage records the scheduled change; config.ini keeps the key.
  const keel::checkpoint::Lineage lineage = lineage_of(run);
  ASSERT_EQ(lineage.batch_changes.size(), 1u);
  EXPECT_EQ(lineage.batch_changes[0].step, 2);
  EXPECT_EQ(lineage.batch_changes[0].from, 16);
  EXPECT_EQ(lineage.batch_changes[0].to, 32);
  EXPECT_EQ(lineage.batch_changes[0].origin, "train.batch_schedule");
  EXPECT_NE(keel::checkpoint::read_small_file(run + "/config.ini").find("batch_schedule = 0:16;2:32"),
            std::string::npos);
  // A constant run's lineage.json has no batch_changes at all.
  EXPECT_EQ(keel::checkpoint::read_small_file(constant_run() + "/lineage.json").find("batch_changes"),
            std::string::npos);
}

TEST(BatchChange, ResumeWithAnotherBatchContinuesTheLedgerAndTheLrByStep) {
  const std::string parent = fresh_dir("batch-parent"), child = fresh_dir("batch-child");
  auto r =
      run_keel("train " + tiny_args("--set train.steps=4 --set checkpoint.every=2" + kCommon) + " --run-dir " + parent);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + parent + "/checkpoints/step-00000002 --run-dir " + child +
               " --set train.grad_accum=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("the global batch from step 2 is 32 sequences (the checkpoint's config: 16)"),
            std::string::npos)
      << r.output;
  // Steps 0-1 of the parent (16 each) then steps 2-3 of the child (32 each): the constant run's 96 samples.
  std::vector<size_t> sizes;
  std::vector<Sample> got = recorded(parent, 0, 1);
  const std::vector<Sample> tail = recorded(child, 2, 3, &sizes);
  EXPECT_EQ(sizes, (std::vector<size_t>{32, 32}));
  got.insert(got.end(), tail.begin(), tail.end());
  const std::vector<Sample> want = recorded(constant_run(), 0, 5);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want) << "the resumed run lost or repeated samples";
  // The LR is by optimizer step, whatever the batch: the child's steps 2-3 have the parent's LR.
  const auto lr_parent = MetricsReader(parent + "/metrics.h5").read_double("/train/lr");
  const auto lr_child = MetricsReader(child + "/metrics.h5").read_double("/train/lr");
  ASSERT_EQ(lr_parent.size(), 4u);
  ASSERT_EQ(lr_child.size(), 2u);
  EXPECT_EQ(lr_child[0], lr_parent[2]);
  EXPECT_EQ(lr_child[1], lr_parent[3]);
  // The lineage: the config change and the batch change with its step; a note says how the ledger continues.
  const keel::checkpoint::Lineage lineage = lineage_of(child);
  ASSERT_EQ(lineage.batch_changes.size(), 1u);
  EXPECT_EQ(lineage.batch_changes[0].step, 2);
  EXPECT_EQ(lineage.batch_changes[0].from, 16);
  EXPECT_EQ(lineage.batch_changes[0].to, 32);
  bool noted = false;
  for (const auto& n : lineage.notes) noted |= n == "data: global batch from step 2: 32 sequences (was 16)";
  EXPECT_TRUE(noted) << keel::checkpoint::lineage_to_json(lineage);
  const auto tree = run_keel("inspect " + parent + " " + child);
  EXPECT_NE(tree.output.find("global batch from step 2: 16 -> 32"), std::string::npos) << tree.output;
  // show-batch --run reconstructs the child's steps, before and after the change, from the lineage alone.
  const auto shown = run_keel("data show-batch --run " + child + " --step 1 --to 3 --json --tokens 1");
  ASSERT_EQ(shown.exit_code, 0) << shown.output;
  std::vector<Sample> replayed;
  std::istringstream lines(shown.output);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("{", 0) != 0) continue;
    const json step = json::parse(line);
    for (const auto& s : step.at("samples"))
      replayed.push_back({s.at("source").get<std::string>(), s.at("sample_id").get<int64_t>()});
  }
  ASSERT_EQ(replayed.size(), 16u + 32 + 32) << shown.output.substr(0, 2000);
  EXPECT_TRUE(std::vector<Sample>(replayed.begin(), replayed.end()) ==
              std::vector<Sample>(want.begin() + 16, want.begin() + 96));
}

TEST(BatchChange, TwoDataParallelRanksSplitAScheduledBatchAsOneProcessTrainsIt) {
  const std::string single = fresh_dir("batch-dp1"), dp2 = fresh_dir("batch-dp2");
  const std::string flags = " --set train.steps=3 --set 'train.batch_schedule=0:16;1:32;2:48'" + kCommon;
  auto r = run_keel("train " + tiny_args(flags) + " --run-dir " + single);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("launch --nproc 2 -- " + std::string(KEEL_BINARY) + " train " +
               tiny_args(flags + " --set parallel.dp=2") + " --run-dir " + dp2);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<size_t> sizes;
  EXPECT_TRUE(recorded(dp2, 0, 2, &sizes) == recorded(single, 0, 2));
  EXPECT_EQ(sizes, (std::vector<size_t>{16, 32, 48}));
  const auto want = MetricsReader(single + "/metrics.h5").read_double("/train/loss");
  const auto got = MetricsReader(dp2 + "/metrics.h5").read_double("/train/loss");
  ASSERT_EQ(got.size(), 3u);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << "step " << i;
  // A schedule the layout cannot split is refused before training, naming the key and the step.
  r = run_keel("launch --nproc 2 -- " + std::string(KEEL_BINARY) + " train " +
               tiny_args(" --set 'train.batch_schedule=0:16;2:24' --set parallel.dp=2") + " --run-dir " +
               fresh_dir("batch-dp2-bad"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("train.batch_schedule: the global batch from step 2 (24) must be divisible by parallel.dp "
                          "x the micro-batch of a rank (2 x 8 = 16)"),
            std::string::npos)
      << r.output;
}

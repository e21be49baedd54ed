// Why: skip rules are decisions about data that must survive every reload of a data ledger. A spike that comes
// back after each rollback (the lr_spike fixture with once=false) makes rollback_skip roll back three times to the
// same checkpoint: each rollback must keep the rules of the earlier ones, so that no replay trains on a batch
// already skipped (the bug: rollback 2 replayed the original bad batch, bit for bit). A resume from that
// checkpoint, taken after the rollbacks, must carry the parent's later rules, and a resume must not end rules
// that came from rollbacks (only the config's data.skip is the config's to end).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"
#include "core/data/loader.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using nlohmann::json;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

json ledger_of(const std::string& checkpoint_dir) {
  return json::parse(keel::checkpoint::read_rank_file(checkpoint_dir + "/rank-00000.h5").data_ledger);
}
// "prose:samples:5-6;code:samples:9" → {(prose, 5), (prose, 6), (code, 9)}.
std::set<std::pair<std::string, int64_t>> samples_of(const std::string& rules) {
  std::set<std::pair<std::string, int64_t>> out;
  std::stringstream in(rules);
  std::string rule;
  while (std::getline(in, rule, ';')) {
    const size_t a = rule.find(':'), b = rule.rfind(':');
    const std::string range = rule.substr(b + 1);
    const size_t dash = range.find('-');
    const int64_t first = std::stoll(range.substr(0, dash));
    const int64_t last = dash == std::string::npos ? first : std::stoll(range.substr(dash + 1));
    for (int64_t id = first; id <= last; ++id) out.emplace(rule.substr(0, a), id);
  }
  return out;
}

}  // namespace

TEST(SkipRules, ThreeRollbacksAccumulateAndAResumeKeepsThem) {
  const std::string run = fresh_dir("skip-three"), branch = fresh_dir("skip-three-resume"),
                    onward = fresh_dir("skip-three-onward"), damaged = fresh_dir("skip-three-damaged");
  // The LR spike at step 12 fires on every pass (once=false): the loss of step 13 jumps each time, rollback_skip
  // returns to checkpoint 12 three times (max_rollbacks), then only skips the update.
  auto r = run_keel("train " + tiny_args("--set train.steps=16 --set checkpoint.every=4") + " --run-dir " + run +
                    " --plugin lr_schedule=" + fixture_plugin("lr_spike") + " --plugin-arg lr_spike.once=false" +
                    " --plugin spike_handler=rollback_skip --plugin-arg rollback_skip.threshold=4" +
                    " --plugin-arg rollback_skip.skip=samples");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  MetricsReader reader(run + "/metrics.h5");
  std::vector<std::string> skipped;  // per rollback, the rules it added
  for (const auto& e : reader.read_events()) {
    if (e.kind != "rollback") continue;
    ASSERT_EQ(e.text.rfind("step 13 -> checkpoint step 12; skip ", 0), 0u) << e.text;
    const size_t begin = std::string("step 13 -> checkpoint step 12; skip ").size();
    const size_t end = std::min(e.text.find("; ", begin), e.text.find(" (", begin));
    skipped.push_back(e.text.substr(begin, end - begin));
    if (skipped.size() > 1) EXPECT_NE(e.text.find("; kept "), std::string::npos) << e.text;
  }
  ASSERT_EQ(skipped.size(), 3u) << r.output;
  // Each rollback skipped a batch no earlier rollback had skipped: the replays never saw a skipped sample again.
  std::set<std::pair<std::string, int64_t>> all;
  for (const auto& rules : skipped) {
    const auto ids = samples_of(rules);
    ASSERT_EQ(ids.size(), 16u) << rules;  // the global batch: 8 x 2
    for (const auto& id : ids) EXPECT_TRUE(all.insert(id).second) << id.first << ":" << id.second << " skipped twice";
  }
  // The step-13 rows (the original and three replays) trained on four different batches: four different losses.
  const auto steps = reader.read_int64("/train/step");
  const auto loss = reader.read_double("/train/loss");
  std::set<double> step13;
  for (size_t i = 0; i < steps.size(); ++i) {
    if (steps[i] == 13) step13.insert(loss[i]);
  }
  EXPECT_EQ(step13.size(), 4u);

  // The final ledger holds every rule, from the rollback step on; skip_rules.json holds the same list.
  const json final_ledger = ledger_of(run + "/checkpoints/step-00000016");
  std::set<std::pair<std::string, int64_t>> in_ledger;
  for (const auto& rule : final_ledger.at("skip")) {
    EXPECT_EQ(rule.at("from_step"), 12) << rule;
    EXPECT_EQ(rule.at("to_step"), -1) << rule;
    EXPECT_EQ(rule.at("origin"), "rollback at step 13 by rollback_skip") << rule;
    for (const auto& id : samples_of(rule.at("spec").get<std::string>())) in_ledger.insert(id);
  }
  EXPECT_EQ(in_ledger, all);
  EXPECT_EQ(final_ledger.at("data_order_version"), 2);
  const json recorded = json::parse(keel::checkpoint::read_small_file(run + "/skip_rules.json"));
  EXPECT_EQ(recorded.at("skip"), final_ledger.at("skip"));
  // Replayed from the ledger, no step from 12 on draws a skipped sample.
  keel::Config config = keel::load_config(tiny_config(), {std::string("data.dir=") + KEEL_TEST_DATA_DIR});
  keel::data::DataLoader loader(config, config.global_batch());
  loader.load_state(final_ledger);
  loader.seek(12);
  for (int64_t step = 12; step < 16; ++step) {
    for (const auto& s : loader.plan_next().samples) {
      EXPECT_EQ(all.count({loader.source_names()[s.source], s.sample_id}), 0u) << "step " << step;
    }
  }

  // A resume from checkpoint 12, written before any of the rules: the parent's later rules are carried. (The
  // spike comes again at step 13; with no checkpoint in the new run dir to roll back to, its update is skipped.)
  r = run_keel("resume --from " + run + "/checkpoints/step-00000012 --run-dir " + branch + " --set train.steps=16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json resumed = ledger_of(branch + "/checkpoints/step-00000016");
  EXPECT_EQ(resumed.at("skip"), final_ledger.at("skip"));
  const auto lineage =
      keel::checkpoint::parse_lineage(keel::checkpoint::read_small_file(branch + "/lineage.json"), "lineage.json");
  int kept_notes = 0;
  for (const auto& note : lineage.notes) {
    kept_notes += note.find("(kept: rollback at step 13 by rollback_skip)") != std::string::npos;
  }
  EXPECT_EQ(kept_notes, static_cast<int>(final_ledger.at("skip").size()));

  // A resume from the end: the rules came from rollbacks, not from data.skip, so they stay in force.
  r = run_keel("resume --from " + run + " --run-dir " + onward + " --set train.steps=20");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ledger_of(onward + "/checkpoints/step-00000020").at("skip"), final_ledger.at("skip"));

  // A damaged skip_rules.json: the resume warns, naming it, and goes on with the checkpoint's rules.
  std::ofstream(run + "/skip_rules.json") << "{not json";
  r = run_keel("resume --from " + run + "/checkpoints/step-00000012 --run-dir " + damaged + " --set train.steps=16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("skip rules of the parent run not carried: " + run + "/skip_rules.json"), std::string::npos)
      << r.output;
  EXPECT_TRUE(ledger_of(damaged + "/checkpoints/step-00000016").at("skip").empty());
  for (const auto& dir : {run, branch, onward, damaged}) fs::remove_all(dir);
}

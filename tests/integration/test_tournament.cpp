// Why: `keel tournament` end to end through the binary on the tiny config: four arms x two replicates resumed from
// one checkpoint of an 8-step run name a winner with its interval (the baseline, against three arms that cannot
// learn: their LR is ~0 or tiny, their epsilon is huge), every arm of a replicate trains on the
// same samples in the same slots (/data/batch) while the two replicates differ, every branch is an ordinary run
// with a lineage, the --json object is the tournament.json written, and a bad arms file or an arm's bad config
// key is refused naming the file and line before anything runs; --measure train-loss pairs the last steps'
// sample losses instead of held-out windows. About 20 s on 2 cores.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_store.h"
#include "core/metrics/metrics_reader.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* const kArms =
    "# three arms that cannot learn, and the control\n"
    "[arm.baseline]\n"
    "[arm.slow]\n"
    "set = optim.lr=1e-6 optim.min_lr=1e-7\n"
    "[arm.frozen]\n"
    "set = optim.lr=1e-9 optim.min_lr=1e-10\n"
    "[arm.huge_eps]\n"
    "eps = 10\n"
    "skip_spikes = true\n";

std::string write_file(const std::string& dir, const std::string& name, const std::string& text) {
  fs::create_directories(dir);
  std::ofstream(dir + "/" + name) << text;
  return dir + "/" + name;
}

// The 8-step run the tournament branches from (its step-4 checkpoint).
const std::string& base_checkpoint() {
  static const std::string ckpt = [] {
    const std::string dir = fresh_dir("tournament-base");
    const ProcessResult r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " +
                                     dir + " --set train.steps=8 --set checkpoint.every=4");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return dir + "/checkpoints/" + checkpoint::step_dir_name(4);
  }();
  return ckpt;
}

json parse_json(const std::string& output) {
  const size_t brace = output.find('{');
  return brace == std::string::npos ? json() : json::parse(output.substr(brace), nullptr, false);
}

// (source, sample id) of every slot of steps 4..6, in order.
std::vector<std::pair<int64_t, int64_t>> samples(const std::string& run_dir) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const auto& [step, rows] : metrics::MetricsReader(run_dir + "/metrics.h5").read_batches_by_step())
    for (const auto& r : rows) out.emplace_back(r.source, r.sample_id);
  return out;
}

TEST(Tournament, FourArmsTwoReplicatesNameAWinnerWithItsIntervalOnPairedData) {
  const std::string dir = fresh_dir("tournament");
  const std::string arms = write_file(dir + "-in", "arms.ini", kArms);
  const std::string out = dir + "/t";
  const ProcessResult r =
      run_keel_within(300, "tournament --from " + base_checkpoint() + " --arms " + arms +
                               " --steps 3 --seeds 2 --jobs 2 --out " + out + " --windows 16 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = parse_json(r.output);
  ASSERT_TRUE(j.is_object()) << r.output;
  std::ifstream written(out + "/tournament.json");
  EXPECT_EQ(json::parse(written), j) << "--json prints what OUT/tournament.json holds";

  EXPECT_EQ(j.at("format"), "keel-tournament");
  EXPECT_EQ(j.at("from_step"), 4);
  EXPECT_EQ(j.at("steps"), 3);
  EXPECT_EQ(j.at("seeds"), 2);
  EXPECT_EQ(j.at("measure_kind"), "heldout") << "the prepared test data has held-out documents";
  EXPECT_EQ(j.at("units"), 2 * 2 * 16) << "2 sources x 16 windows x 2 replicates";
  EXPECT_NE(j.at("test").get<std::string>().find("paired bootstrap"), std::string::npos);
  EXPECT_EQ(j.at("baseline"), "baseline");
  ASSERT_EQ(j.at("arms").size(), 4u);
  for (const auto& arm : j.at("arms")) {
    EXPECT_EQ(arm.at("run_dirs").size(), 2u);
    EXPECT_TRUE(std::isfinite(arm.at("mean_nll").get<double>()));
    const auto& ci = arm.at("vs_baseline").at("ci95");
    EXPECT_LE(ci[0].get<double>(), arm.at("vs_baseline").at("mean_diff").get<double>());
    EXPECT_GE(ci[1].get<double>(), arm.at("vs_baseline").at("mean_diff").get<double>());
  }
  EXPECT_EQ(j.at("arms")[3].at("changes"), json({"eps = 10", "skip_spikes = true"}));

  // The winner: the only arm that learns, with an interval against the runner-up entirely below 0.
  EXPECT_EQ(j.at("winner"), "baseline") << j.dump(2);
  const auto& w = j.at("winner_vs_runner_up");
  EXPECT_EQ(w.at("best"), "baseline");
  EXPECT_LT(w.at("ci95")[1].get<double>(), 0.0);
  EXPECT_EQ(j.at("verdict").get<std::string>().rfind("winner: baseline (mean NLL", 0), 0u) << j.at("verdict");
  for (const auto& arm : j.at("arms"))
    if (!arm.at("baseline").get<bool>()) EXPECT_GT(arm.at("vs_baseline").at("ci95")[0].get<double>(), 0.0);

  // Paired data: within a replicate every arm trained on the same samples in the same slots; replicates differ.
  for (int seed = 0; seed < 2; ++seed) {
    const auto reference = samples(out + "/baseline-seed" + std::to_string(seed));
    EXPECT_EQ(reference.size(), 3u * 16u);
    for (const std::string arm : {"slow", "frozen", "huge_eps"})
      EXPECT_EQ(samples(out + "/" + arm + "-seed" + std::to_string(seed)), reference) << arm << " seed " << seed;
  }
  EXPECT_NE(samples(out + "/baseline-seed0"), samples(out + "/baseline-seed1"));

  // Every branch is a run with a lineage naming the checkpoint; the table and the report are written.
  std::ifstream lineage(out + "/frozen-seed1/lineage.json");
  ASSERT_TRUE(lineage.good());
  EXPECT_NE(json::parse(lineage).dump().find(checkpoint::step_dir_name(4)), std::string::npos);
  std::ifstream table(out + "/tournament.txt");
  const std::string text((std::istreambuf_iterator<char>(table)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("winner: baseline"), std::string::npos) << text;
  EXPECT_NE(text.find("set = optim.lr=1e-9 optim.min_lr=1e-10"), std::string::npos) << text;
  EXPECT_GT(fs::file_size(out + "/report.html"), 1000u);
  // keel report of OUT shows the arms: the tournament dir stands for its branches, A/B against its baseline.
  const json report = parse_json(run_keel("report " + out + " --json").output);
  ASSERT_TRUE(report.is_object());
  EXPECT_EQ(report.at("runs").size(), 8u) << report.dump();
  EXPECT_EQ(report.at("runs")[0].at("arm"), "baseline");

  const ProcessResult again =
      run_keel("tournament --from " + base_checkpoint() + " --arms " + arms + " --steps 3 --out " + out);
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.output.find("exists; a tournament never overwrites one"), std::string::npos) << again.output;
}

TEST(Tournament, WithoutHeldOutTheUnitsAreTheLastStepsSampleLosses) {
  const std::string dir = fresh_dir("tournament-train-loss");
  const std::string arms =
      write_file(dir, "arms.ini", "[arm.baseline]\n[arm.frozen]\nset = optim.lr=1e-9 optim.min_lr=0\n");
  const ProcessResult r = run_keel("tournament --from " + base_checkpoint() + " --arms " + arms +
                                   " --steps 2 --measure train-loss --out " + dir + "/t --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = parse_json(r.output);
  EXPECT_EQ(j.at("measure_kind"), "train_loss");
  EXPECT_NE(j.at("measure").get<std::string>().find("per-sample training loss of steps 4..5"), std::string::npos)
      << j.at("measure");
  EXPECT_EQ(j.at("units"), 2 * 16) << "2 steps x 16 samples";
  // Step 4's samples meet the checkpoint's weights in both arms; step 5 shows the frozen arm's missing update.
  EXPECT_GT(j.at("arms")[1].at("vs_baseline").at("mean_diff").get<double>(), 0.0);
  const ProcessResult bad = run_keel("tournament --from " + base_checkpoint() + " --arms " + arms +
                                     " --steps 2 --measure nll --out " + dir + "/u");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("--measure must be auto or train-loss, got 'nll'"), std::string::npos) << bad.output;
}

TEST(Tournament, ABadArmsFileIsRefusedByFileAndLineBeforeAnythingRuns) {
  const std::string dir = fresh_dir("tournament-bad");
  const std::string out = dir + "/t";
  const std::string bad = write_file(dir, "bad.ini", "[arm.baseline]\n[arm.a]\n\nlearning_rate = 3\n");
  ProcessResult r = run_keel("tournament --from " + base_checkpoint() + " --arms " + bad + " --steps 2 --out " + out);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.output.rfind("keel tournament: error: " + bad + ":4: [arm.a]: unknown key 'learning_rate'", 0), 0u)
      << r.output;
  // A key the config does not know: found by loading the arm's overrides onto the checkpoint's config.
  const std::string key = write_file(dir, "key.ini", "[arm.baseline]\n[arm.a]\neps = 1e-6\nset = optim.lrr=1\n");
  r = run_keel("tournament --from " + base_checkpoint() + " --arms " + key + " --steps 2 --out " + out);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.output.rfind("keel tournament: error: " + key + ":4: [arm.a]: ", 0), 0u) << r.output;
  EXPECT_NE(r.output.find("optim.lrr"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out)) << "nothing ran";
  r = run_keel("tournament --from " + base_checkpoint() + " --arms " + key + " --steps 0");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--steps must be >= 1"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing

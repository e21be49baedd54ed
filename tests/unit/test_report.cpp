// Why: `keel report` must show the right numbers: which row of a re-run step counts, how the per-tensor heatmap
// is bucketed, the arm/seed naming rule, and the A/B statistics (mean ± sd, paired differences with a t-based
// 95% CI, Welch when no seeds pair up). These are checked here on hand-made numbers whose answers are worked
// out in the comments; the page itself is checked for being self-contained (no external URL, nothing that can
// end its <script> early). tests/integration/test_report.cpp drives the whole command and a headless browser.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <set>
#include <string>

#include "core/eval/eval.h"
#include "core/metrics/metrics_writer.h"
#include "core/report/ab_stats.h"
#include "core/report/report_assets.h"
#include "core/report/report_page.h"
#include "core/report/run_data.h"

using namespace keel::report;
namespace fs = std::filesystem;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("keel-report-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

TrainRow row(int64_t step, double loss) { return TrainRow{step, loss, 1.0, 1e-3, 100.0, false}; }

// A run with `steps` rows of constant loss and one eval file at `eval_step` with the given per-source NLLs.
RunData fake_run(const std::string& dir, double loss, const std::vector<std::pair<std::string, double>>& eval_nll,
                 int64_t eval_step = 10) {
  RunData run;
  run.dir = dir;
  run.name = fs::path(dir).filename().string();
  run.arm = parse_arm_name(dir);
  for (int64_t s = 0; s < 10; ++s) run.rows.push_back(row(s, loss));
  if (!eval_nll.empty()) {
    EvalResult e;
    e.step = eval_step;
    for (const auto& [source, nll] : eval_nll) e.sources.push_back({source, nll, std::exp(nll), 64, 0});
    run.evals.push_back(e);
  }
  return run;
}

const ArmMetric* find_row(const AbTable& t, const std::string& arm, const std::string& kind,
                          const std::string& source = "") {
  for (const auto& r : t.rows) {
    if (r.arm == arm && r.metric.kind == kind && r.metric.source == source) return &r;
  }
  return nullptr;
}

}  // namespace

TEST(ReportArms, SeedSuffixIsStrippedFromTheBasename) {
  EXPECT_EQ(parse_arm_name("runs/base-seed3").arm, "base");
  EXPECT_EQ(parse_arm_name("runs/base-seed3").seed, 3);
  EXPECT_EQ(parse_arm_name("/tmp/x/lr-half-s2/").arm, "lr-half");
  EXPECT_EQ(parse_arm_name("/tmp/x/lr-half-s2/").seed, 2);
  EXPECT_EQ(parse_arm_name("lr-half").arm, "lr-half");
  EXPECT_EQ(parse_arm_name("lr-half").seed, -1);
  EXPECT_EQ(parse_arm_name("mix-seedling").arm, "mix-seedling");  // not digits
  EXPECT_EQ(parse_arm_name("-seed1").arm, "-seed1");              // nothing would be left of the arm
  EXPECT_EQ(parse_arm_name("a-s1-seed12").arm, "a-s1");           // only the trailing suffix goes
  EXPECT_EQ(parse_arm_name("a-s1-seed12").seed, 12);
}

TEST(ReportRows, TheLastRowOfAReRunStepCountsAndEarlierOnesAreKeptApart) {
  // A rollback at step 3 back to step 2: rows 0 1 2 3 | 2 3 4.
  const std::vector<TrainRow> all{row(0, 5), row(1, 4), row(2, 3), row(3, 30), row(2, 3.1), row(3, 2.9), row(4, 2.8)};
  std::vector<TrainRow> kept, superseded;
  std::vector<size_t> indices;
  split_superseded(all, kept, superseded, &indices);
  ASSERT_EQ(kept.size(), 5u);
  EXPECT_EQ(indices, (std::vector<size_t>{0, 1, 4, 5, 6}));
  EXPECT_DOUBLE_EQ(kept[2].loss, 3.1);
  EXPECT_DOUBLE_EQ(kept[3].loss, 2.9);
  ASSERT_EQ(superseded.size(), 2u);
  EXPECT_EQ(superseded[1].step, 3);
  EXPECT_DOUBLE_EQ(superseded[1].loss, 30);  // the spike stays visible as a discarded row
}

TEST(ReportRows, FinalTrainLossIsTheMeanOfTheLastTenPercent) {
  std::vector<TrainRow> rows;
  for (int64_t s = 0; s < 20; ++s) rows.push_back(row(s, static_cast<double>(s)));
  EXPECT_DOUBLE_EQ(final_train_loss(rows), (18.0 + 19.0) / 2);  // 10% of 20 = 2 rows
  rows.resize(5);
  EXPECT_DOUBLE_EQ(final_train_loss(rows), 4.0);  // at least one row
  rows.push_back(row(5, kNaN));
  rows.push_back(row(6, 7.0));  // 7 rows: ceil(0.7) = 1 row
  EXPECT_DOUBLE_EQ(final_train_loss(rows), 7.0);
  rows.back().loss = kNaN;
  EXPECT_TRUE(std::isnan(final_train_loss(rows)));
  EXPECT_TRUE(std::isnan(final_train_loss({})));
}

TEST(ReportHeatmap, ColumnsHoldTheLargestNormOfTheirStepsOnALog10Scale) {
  keel::metrics::Matrix m;
  m.rows = 5;
  m.cols = 2;
  // rows: tensor a, tensor b
  m.values = {1, 0.1f, 10, std::nanf(""), 100, 0.01f, 1000, std::nanf(""), 1, std::nanf("")};
  const TensorHeatmap h = bucket_heatmap(m, {"a", "b"}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}, 2);
  // Columns: rows [0, 2) and [2, 5).
  EXPECT_EQ(h.column_first_step, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(h.column_last_step, (std::vector<int64_t>{1, 4}));
  EXPECT_NEAR(h.log10_grad_norm[0][0], 1.0, 1e-6);  // max(1, 10)
  EXPECT_NEAR(h.log10_grad_norm[0][1], 3.0, 1e-6);  // max(100, 1000, 1)
  EXPECT_NEAR(h.log10_grad_norm[1][0], -1.0, 1e-6);
  EXPECT_NEAR(h.log10_grad_norm[1][1], -2.0, 1e-6);
  // Only the kept rows count, one column per step when there are few.
  const TensorHeatmap k = bucket_heatmap(m, {"a", "b"}, {1, 3}, {1, 2}, 300);
  EXPECT_EQ(k.column_first_step, (std::vector<int64_t>{1, 2}));
  EXPECT_NEAR(k.log10_grad_norm[0][1], 3.0, 1e-6);
  EXPECT_TRUE(std::isnan(k.log10_grad_norm[1][1]));  // never measured
  EXPECT_THROW(bucket_heatmap(m, {"a"}, {0}, {0}, 2), std::invalid_argument);
  EXPECT_THROW(bucket_heatmap(m, {"a", "b"}, {0, 1}, {0}, 2), std::invalid_argument);
  EXPECT_THROW(bucket_heatmap(m, {"a", "b"}, {0}, {0}, 0), std::invalid_argument);
}

TEST(ReportStats, MeanAndSampleStandardDeviation) {
  const Summary s = summarize({1, 2, 3, 4});
  EXPECT_EQ(s.n, 4);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_NEAR(s.sd, std::sqrt(5.0 / 3.0), 1e-12);  // squares 2.25+0.25+0.25+2.25 = 5, over n-1 = 3
  EXPECT_TRUE(std::isnan(summarize({7}).sd));
  EXPECT_DOUBLE_EQ(summarize({7}).mean, 7);
  EXPECT_TRUE(std::isnan(summarize({}).mean));
}

TEST(ReportStats, StudentTQuantilesMatchTheTables) {
  EXPECT_NEAR(t_quantile_975(1), 12.7062, 1e-4);
  EXPECT_NEAR(t_quantile_975(2), 4.3027, 1e-4);
  EXPECT_NEAR(t_quantile_975(4), 2.7764, 1e-4);
  EXPECT_NEAR(t_quantile_975(30), 2.0423, 1e-4);
  EXPECT_TRUE(std::isnan(t_quantile_975(0)));
}

TEST(ReportStats, PairedDifferenceWithATInterval) {
  // d = {2-1, 3-1, 5-2} = {1, 2, 3}: mean 2, sd 1, half width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841.
  const Difference d = paired_difference({2, 3, 5}, {1, 1, 2});
  EXPECT_TRUE(d.paired);
  EXPECT_EQ(d.n, 3);
  EXPECT_DOUBLE_EQ(d.mean, 2);
  EXPECT_NEAR(d.sd, 1, 1e-12);
  EXPECT_NEAR(d.ci_low, 2 - 2.48414, 1e-4);
  EXPECT_NEAR(d.ci_high, 2 + 2.48414, 1e-4);
  const Difference one = paired_difference({2}, {1.5});
  EXPECT_DOUBLE_EQ(one.mean, 0.5);
  EXPECT_TRUE(std::isnan(one.sd));
  EXPECT_TRUE(std::isnan(one.ci_low));
  EXPECT_THROW(paired_difference({1, 2}, {1}), std::invalid_argument);
}

TEST(ReportStats, WelchDifferenceWhenNoSeedsPair) {
  // a = {1,2,3}, b = {2,4,6}: diff -2; se = sqrt(1/3 + 4/3) = 1.2910; df = (5/3)^2 / ((1/9)/2 + (16/9)/2) = 2.94,
  // so the t quantile lies between t(3) = 3.1824 and t(2) = 4.3027.
  const Difference d = welch_difference({1, 2, 3}, {2, 4, 6});
  EXPECT_FALSE(d.paired);
  EXPECT_DOUBLE_EQ(d.mean, -2);
  const double half = (d.ci_high - d.ci_low) / 2, se = std::sqrt(5.0 / 3.0);
  EXPECT_NEAR((d.ci_high + d.ci_low) / 2, -2, 1e-12);
  EXPECT_GT(half / se, 3.1824);
  EXPECT_LT(half / se, 4.3027);
  EXPECT_TRUE(std::isnan(welch_difference({1}, {2, 3}).ci_low));
  EXPECT_DOUBLE_EQ(welch_difference({1}, {2, 3}).mean, -1.5);
}

TEST(ReportAbTable, ArmsSeedsBaselineAndPairedDifferences) {
  const std::vector<RunData> runs{
      fake_run("r/base-seed1", 3.0, {{"prose", 2.0}, {"code", 1.0}}),
      fake_run("r/base-seed2", 3.2, {{"prose", 2.2}, {"code", 1.1}}),
      fake_run("r/new-seed2", 2.9, {{"prose", 2.0}, {"code", 1.3}}),
      fake_run("r/new-seed1", 2.7, {{"prose", 1.7}, {"code", 1.2}}),
  };
  const AbTable t = build_ab_table(runs, "");
  EXPECT_EQ(t.baseline, "base");
  EXPECT_EQ(t.arms, (std::vector<std::string>{"base", "new"}));
  EXPECT_TRUE(t.notes.empty());
  // Train loss: base {3.0, 3.2} -> 3.1 ± 0.1414; new {2.9, 2.7} -> 2.8.
  const ArmMetric* base_loss = find_row(t, "base", "final_train_loss");
  ASSERT_NE(base_loss, nullptr);
  EXPECT_NEAR(base_loss->summary.mean, 3.1, 1e-12);
  EXPECT_NEAR(base_loss->summary.sd, std::sqrt(0.02), 1e-12);
  EXPECT_FALSE(base_loss->has_difference);
  // Paired by seed index: seed1 2.7-3.0 = -0.3, seed2 2.9-3.2 = -0.3 -> mean -0.3, sd 0, CI [-0.3, -0.3].
  const ArmMetric* new_loss = find_row(t, "new", "final_train_loss");
  ASSERT_NE(new_loss, nullptr);
  ASSERT_TRUE(new_loss->has_difference);
  EXPECT_TRUE(new_loss->difference.paired);
  EXPECT_EQ(new_loss->difference.n, 2);
  EXPECT_NEAR(new_loss->difference.mean, -0.3, 1e-12);
  EXPECT_NEAR(new_loss->difference.sd, 0.0, 1e-12);
  // Eval prose: seed1 1.7-2.0 = -0.3, seed2 2.0-2.2 = -0.2 -> mean -0.25, sd 0.0707, half width
  // t(0.975, 1) * 0.0707 / sqrt(2) = 12.7062 * 0.05 = 0.6353.
  const ArmMetric* prose = find_row(t, "new", "eval_loss", "prose");
  ASSERT_NE(prose, nullptr);
  EXPECT_EQ(prose->metric.eval_step, 10);
  EXPECT_NEAR(prose->difference.mean, -0.25, 1e-12);
  EXPECT_NEAR(prose->difference.sd, std::sqrt(0.005), 1e-12);
  EXPECT_NEAR(prose->difference.ci_low, -0.25 - 0.63531, 1e-4);
  EXPECT_NEAR(prose->difference.ci_high, -0.25 + 0.63531, 1e-4);
  EXPECT_EQ(prose->seeds, (std::vector<int64_t>{2, 1}));
  const ArmMetric* ppl = find_row(t, "new", "eval_perplexity", "code");
  ASSERT_NE(ppl, nullptr);
  EXPECT_NEAR(ppl->summary.mean, (std::exp(1.3) + std::exp(1.2)) / 2, 1e-12);
  // Rows: train loss first (both arms), then eval metrics.
  ASSERT_GE(t.rows.size(), 2u);
  EXPECT_EQ(t.rows[0].metric.kind, "final_train_loss");
  EXPECT_EQ(t.rows[1].metric.kind, "final_train_loss");
  EXPECT_EQ(t.rows.size(), 2u + 2 * 2 * 2);  // + 2 arms x 2 sources x (loss, perplexity)

  // Another baseline flips the sign; an unknown one is refused, listing the arms.
  const AbTable flipped = build_ab_table(runs, "new");
  EXPECT_NEAR(find_row(flipped, "base", "final_train_loss")->difference.mean, 0.3, 1e-12);
  try {
    build_ab_table(runs, "nope");
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("base, new"), std::string::npos);
  }
}

TEST(ReportAbTable, UnpairedArmsEvalStepsMissingInARunAndNotes) {
  // new-seed3 has no partner seed in base: Welch. base-seed2 lacks the eval: base's eval rows are dropped.
  std::vector<RunData> runs{fake_run("base-seed1", 3.0, {{"prose", 2.0}}), fake_run("base-seed2", 3.4, {}),
                            fake_run("new-seed3", 2.5, {{"prose", 1.0}})};
  AbTable t = build_ab_table(runs, "");
  const ArmMetric* loss = find_row(t, "new", "final_train_loss");
  ASSERT_NE(loss, nullptr);
  EXPECT_FALSE(loss->difference.paired);
  EXPECT_NEAR(loss->difference.mean, 2.5 - 3.2, 1e-12);
  EXPECT_EQ(find_row(t, "base", "eval_loss", "prose"), nullptr);
  const ArmMetric* prose = find_row(t, "new", "eval_loss", "prose");
  ASSERT_NE(prose, nullptr);
  EXPECT_FALSE(prose->has_difference);  // the baseline has no such metric

  const AbTable one = build_ab_table({fake_run("solo", 3.0, {})}, "");
  ASSERT_EQ(one.notes.size(), 2u);
  EXPECT_NE(one.notes[0].find("one run only"), std::string::npos);
  EXPECT_NE(one.notes[1].find("no eval files"), std::string::npos);
  EXPECT_EQ(one.rows.size(), 1u);
  const AbTable seeds =
      build_ab_table({fake_run("a-seed1", 3.0, {{"p", 1}}), fake_run("a-seed2", 3.0, {{"p", 1}})}, "");
  ASSERT_EQ(seeds.notes.size(), 1u);
  EXPECT_NE(seeds.notes[0].find("seeds of one arm"), std::string::npos);
  EXPECT_TRUE(build_ab_table({}, "").rows.empty());
}

TEST(ReportGather, ReadsMetricsEventsTensorsLineageAndEvalFiles) {
  const std::string dir = fresh_dir("gather") + "/arm-seed4";
  fs::create_directories(dir);
  {
    keel::metrics::MetricsWriter w(dir + "/metrics.h5", keel::metrics::OpenMode::kCreate, {{"optim.lr", "0.1"}},
                                   {"embed.weight", "head.weight"}, 100);
    for (int64_t s : {0, 1, 2, 1, 2, 3}) {  // rows 1 and 2 re-run after a rollback
      keel::metrics::StepRow r;
      r.step = s;
      r.loss = 10.0 - static_cast<double>(s);
      r.grad_norm = 1.0;
      r.lr = 0.1;
      r.tokens_per_s = 1000;
      r.skipped = s == 3;
      r.tensor_grad_norms = {static_cast<float>(s + 1), 0.5f};
      w.append(r);
    }
    w.event(2, "rollback", "step 2 -> checkpoint step 1");
    w.event(3, "skip", "[zscore_skip] spike");
  }
  {
    std::ofstream(dir + "/lineage.json")
        << R"({"run_id": "run-1", "run_dir": ")" << dir
        << R"(", "kind": "branch", "parent": {"run_id": "run-0", "run_dir": "base", "checkpoint": "base/checkpoints/step-00000001", "step": 1}, "changes": [{"key": "optim.lr", "from": "0.2", "to": "0.1"}], "notes": [], "data_change_allowed": false})";
  }
  fs::create_directories(dir + "/eval");
  keel::eval::EvalReport er;
  er.checkpoint_dir = dir + "/checkpoints/step-00000003";
  er.step = 3;
  er.source_names = {"prose"};
  keel::eval::SourcePerplexity p;
  p.source = "prose";
  p.sample_ids = {1, 2};
  p.sample_nll = {1.0, 2.0};
  p.tokens = 128;
  p.seen_in_training = 1;
  p.mean_nll = 1.5;
  p.perplexity = std::exp(1.5);
  er.perplexity.push_back(p);
  er.memorization_summary = keel::eval::summarize_memorization(er.memorization, 1);
  keel::eval::write_report(dir + "/eval/step-00000003.h5", er);
  std::ofstream(dir + "/eval/notes.txt") << "not an eval file";

  const RunData run = gather_run(dir);
  EXPECT_EQ(run.name, "arm-seed4");
  EXPECT_EQ(run.arm.arm, "arm");
  EXPECT_EQ(run.arm.seed, 4);
  ASSERT_EQ(run.rows.size(), 4u);
  EXPECT_DOUBLE_EQ(run.rows[1].loss, 9.0);
  EXPECT_TRUE(run.rows[3].skipped);
  EXPECT_EQ(run.superseded.size(), 2u);
  ASSERT_EQ(run.events.size(), 2u);
  EXPECT_EQ(run.events[0].kind, "rollback");
  EXPECT_EQ(run.heatmap.tensor_names, (std::vector<std::string>{"embed.weight", "head.weight"}));
  ASSERT_EQ(run.heatmap.column_first_step.size(), 4u);
  // Column of step 2 is the re-run row (row 4: s = 2 -> 3), not the first one.
  EXPECT_NEAR(run.heatmap.log10_grad_norm[0][2], std::log10(3.0), 1e-6);
  ASSERT_TRUE(run.lineage.has_value());
  EXPECT_EQ(run.lineage->parent_run_id, "run-0");
  EXPECT_EQ(run.lineage->kind(), "branch");
  ASSERT_EQ(run.evals.size(), 1u);
  EXPECT_EQ(run.evals[0].step, 3);
  ASSERT_EQ(run.evals[0].sources.size(), 1u);
  EXPECT_DOUBLE_EQ(run.evals[0].sources[0].nll, 1.5);
  EXPECT_EQ(run.evals[0].sources[0].seen_in_training, 1);
  EXPECT_EQ(run.config.at(0).first, "optim.lr");

  // The JSON the page reads: NaN as null, the re-run rows apart, the eval and the lineage parent.
  const nlohmann::json j = report_json({run}, build_ab_table({run}, ""), "t");
  EXPECT_EQ(j["runs"][0]["steps"], nlohmann::json({0, 1, 2, 3}));
  EXPECT_EQ(j["runs"][0]["superseded"]["step"], nlohmann::json({1, 2}));
  EXPECT_EQ(j["runs"][0]["skipped_steps"], nlohmann::json({3}));
  EXPECT_EQ(j["runs"][0]["lineage"]["parent"]["step"], 1);
  EXPECT_EQ(j["runs"][0]["evals"][0]["sources"][0]["source"], "prose");
  EXPECT_TRUE(j["ab"]["rows"][0]["sd"].is_null());  // one run: no sd
}

TEST(ReportGather, MissingRunDirMetricsOrBadFilesAreNamed) {
  const std::string root = fresh_dir("missing");
  try {
    gather_run(root + "/nope");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(root + "/nope: no such run directory"), std::string::npos) << e.what();
  }
  try {
    gather_run(root);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(root + "/metrics.h5: missing"), std::string::npos) << e.what();
  }
  { keel::metrics::MetricsWriter w(root + "/metrics.h5", keel::metrics::OpenMode::kCreate, {}, {}, 1); }
  fs::create_directories(root + "/eval");
  std::ofstream(root + "/eval/step-00000001.h5") << "not hdf5";
  try {
    gather_run(root);
    FAIL();
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("step-00000001.h5"), std::string::npos) << e.what();
  }
  fs::remove(root + "/eval/step-00000001.h5");
  std::ofstream(root + "/lineage.json") << "{broken";
  EXPECT_THROW(gather_run(root), std::exception);
  fs::remove(root + "/lineage.json");
  const RunData empty = gather_run(root);  // no rows, no per-tensor columns, no lineage: still a run
  EXPECT_TRUE(empty.rows.empty());
  EXPECT_TRUE(empty.heatmap.empty());
  EXPECT_FALSE(empty.lineage.has_value());
}

TEST(ReportPage, SelfContainedWithTheDataSafeInsideItsScript) {
  ASSERT_GT(chart_library().size(), 500000u) << "the embedded ECharts build";
  EXPECT_NE(chart_library().find("version=\"6.1.0\""), std::string_view::npos);
  RunData run = fake_run("runs/evil", 3.0, {});
  run.events.push_back({2, "skip", "</script><script>alert(1)</script> \xE2\x80\xA8"});
  const std::string title = "A <b>&</b> B";
  const std::string page = render_page(report_json({run}, build_ab_table({run}, ""), title), title);
  EXPECT_EQ(page.find("{{"), std::string::npos) << "every placeholder filled";
  EXPECT_NE(page.find("<title>A &lt;b&gt;&amp;&lt;/b&gt; B</title>"), std::string::npos);
  EXPECT_EQ(page.find("</script><script>alert"), std::string::npos);
  EXPECT_NE(page.find(R"(<\/script><script>alert(1)<\/script> \u2028)"), std::string::npos);
  // Exactly the template's four </script> closings (error hooks, library, data, page script).
  size_t closings = 0;
  for (size_t p = page.find("</script"); p != std::string::npos; p = page.find("</script", p + 1)) ++closings;
  EXPECT_EQ(closings, 4u);
  // Nothing is loaded from elsewhere: no src/href/url()/@import, and every URL in the page is an XML namespace
  // or a licence reference inside the vendored library.
  EXPECT_FALSE(std::regex_search(page, std::regex(R"((src|href)\s*=\s*["']?\s*(https?:)?//)", std::regex::icase)));
  EXPECT_FALSE(std::regex_search(page, std::regex(R"(url\(\s*["']?\s*(https?:)?//|@import)", std::regex::icase)));
  const std::set<std::string> allowed{"http://www.w3.org/1999/xlink",
                                      "http://www.w3.org/2000/svg",
                                      "http://www.w3.org/2000/xmlns/",
                                      "http://www.w3.org/XML/1998/namespace",
                                      "http://www.apache.org/licenses/LICENSE-2.0",
                                      "https://github.com/ecomfe/zrender/blob/master/LICENSE"};
  const std::regex url(R"(https?://[^\s"'<>)]+)");
  for (auto it = std::sregex_iterator(page.begin(), page.end(), url); it != std::sregex_iterator(); ++it) {
    EXPECT_TRUE(allowed.count(it->str())) << "external URL in the page: " << it->str();
  }
}

TEST(ReportPage, WriteReplacesAnExistingFileAtomically) {
  const std::string dir = fresh_dir("write");
  const std::string path = dir + "/report.html";
  write_page(path, "first");
  write_page(path, "second");
  std::ifstream in(path);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "second");
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    (void)entry;
    ++files;
  }
  EXPECT_EQ(files, 1u) << "no temporary file left behind";
  try {
    write_page(dir + "/no/such/dir/r.html", "x");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/no/such/dir/r.html"), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_page(dir, "x"), std::runtime_error);  // a directory
}

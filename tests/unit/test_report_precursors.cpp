// Why: the report's stability view must show the right numbers: /stats/ read back as layer x step grids (the last
// row of a re-run step, the max over a layer's heads), one colour scale shared by every run shown, and a spike
// table whose detector, z-score, action and top sources come from the events and per-source losses logged.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/metrics/metrics_writer.h"
#include "core/report/ab_stats.h"
#include "core/report/precursors.h"
#include "core/report/report_page.h"
#include "core/report/run_data.h"

namespace fs = std::filesystem;
using keel::report::gather_run;
using keel::report::RunData;

namespace {

std::string fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("keel-precursors-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

// A run of 6 steps over sources {prose, code}: code's loss jumps at step 5, where zscore_skip skipped the update;
// stats rows at steps 0, 2, 2 (re-run) and 4, 2 layers x 2 heads scaled by `scale`.
std::string write_run(const std::string& name, float scale) {
  const std::string dir = fresh_dir(name);
  keel::metrics::MetricsWriter w(dir + "/metrics.h5", keel::metrics::OpenMode::kCreate, {}, {}, 100);
  w.set_batch_sources({"prose", "code"});
  for (int64_t s = 0; s < 6; ++s) {
    if (s % 2 == 0) {
      const float f = scale * static_cast<float>(s + 1);
      w.stats(s, {{"attn_logit_max", {f, 2 * f, 3 * f, f}}, {"block_rms", {f, 10 * f}}, {"z_max", {f}}});
      if (s == 2)  // a re-run of step 2: this row counts
        w.stats(s, {{"attn_logit_max", {-f, -f, -f, -f}}, {"block_rms", {0.5f, 0.25f}}, {"z_max", {7.0f}}});
    }
    keel::metrics::StepRow r;
    r.step = s;
    r.loss = 3.0;
    r.source_loss = {2.0 + 0.01 * static_cast<double>(s), s == 5 ? 9.0 : 4.0};
    w.append(r);
  }
  w.event(5, "skip", "[zscore_skip] step 5: loss 6.5 has z-score 412.5 > 6 (mean 3, std 0.01, n 5)");
  w.event(5, "checkpoint", "not a decision");
  w.event(4, "rollback", "step 4 -> checkpoint step 2 (rollback_skip: grad_norm 9 has z-score 7e+01 > 6)");
  return dir;
}

TEST(ReportPrecursors, GridsKeepTheLastRowOfAStepAndTheMaxOverHeads) {
  const RunData run = gather_run(write_run("grids", 1.0f));
  const keel::report::PrecursorStats& p = run.precursors;
  ASSERT_EQ(p.steps, (std::vector<int64_t>{0, 2, 4}));
  ASSERT_EQ(p.attn_logit_max.size(), 2u);                                  // layers
  EXPECT_EQ(p.attn_logit_max[0], (std::vector<double>{2.0, -3.0, 10.0}));  // max of heads {f, 2f}; step 2 re-run
  EXPECT_EQ(p.attn_logit_max[1], (std::vector<double>{3.0, -3.0, 15.0}));  // max of heads {3f, f}
  EXPECT_EQ(p.block_rms[1], (std::vector<double>{10.0, 0.25, 50.0}));
  EXPECT_EQ(p.z_max, (std::vector<double>{1.0, 7.0, 5.0}));
}

TEST(ReportPrecursors, SpikeTableNamesDetectorZScoreActionAndTopSources) {
  const RunData run = gather_run(write_run("spikes", 1.0f));
  const auto spikes = keel::report::spike_rows(run);
  ASSERT_EQ(spikes.size(), 2u);  // the checkpoint event is not a decision
  const auto& skip = spikes[0];
  EXPECT_EQ(skip.step, 5);
  EXPECT_EQ(skip.detector, "zscore_skip");
  EXPECT_EQ(skip.action, "skip");
  EXPECT_DOUBLE_EQ(skip.z, 412.5);
  ASSERT_EQ(skip.top_sources.size(), 2u);
  EXPECT_EQ(skip.top_sources[0].first, "code");  // rose 5.0 over its median 4.0
  EXPECT_DOUBLE_EQ(skip.top_sources[0].second, 5.0);
  EXPECT_EQ(skip.top_sources[1].first, "prose");
  const auto& rollback = spikes[1];
  EXPECT_EQ(rollback.detector, "rollback_skip");
  EXPECT_EQ(rollback.action, "rollback");
  EXPECT_DOUBLE_EQ(rollback.z, 70.0);
}

TEST(ReportPrecursors, EveryRunShownSharesOneColourScaleAndThePageHasTheSections) {
  const RunData a = gather_run(write_run("scale-a", 1.0f)), b = gather_run(write_run("scale-b", 3.0f));
  const nlohmann::json j = keel::report::report_json({a, b}, keel::report::build_ab_table({a, b}, ""), "t");
  // attn_logit_max over both runs: lowest -9 (run b's re-run row, -3f), highest 45 (run b, step 4, 3 x 15).
  EXPECT_EQ(j["precursor_scale"]["attn_logit_max"], (nlohmann::json{-9.0, 45.0}));
  EXPECT_EQ(j["precursor_scale"]["block_rms"], (nlohmann::json{0.25, 150.0}));
  EXPECT_EQ(j["runs"][0]["precursors"]["steps"], (nlohmann::json{0, 2, 4}));
  EXPECT_EQ(j["runs"][1]["spikes"][0]["top_sources"][0]["source"], "code");
  EXPECT_EQ(j["runs"][1]["spikes"][0]["z"], 412.5);
  const std::string page = keel::report::render_page(j, "t");
  for (const char* needle : {"id=\"precursor-list\"", "id=\"spike-table\"", "id=\"ab-source-filter\"",
                             "function drawPrecursors", "function drawSpikeTable"})
    EXPECT_NE(page.find(needle), std::string::npos) << needle;
}

TEST(ReportPrecursors, ARunWithoutStatsHasNoGridAndNoScale) {
  const std::string dir = fresh_dir("none");
  {
    keel::metrics::MetricsWriter w(dir + "/metrics.h5", keel::metrics::OpenMode::kCreate, {}, {}, 100);
    keel::metrics::StepRow r;
    w.append(r);
  }
  const RunData run = gather_run(dir);
  EXPECT_TRUE(run.precursors.empty());
  const nlohmann::json j = keel::report::report_json({run}, keel::report::build_ab_table({run}, ""), "t");
  EXPECT_TRUE(j["runs"][0]["precursors"].is_null());
  EXPECT_TRUE(j["precursor_scale"]["attn_logit_max"].is_null());
}

}  // namespace

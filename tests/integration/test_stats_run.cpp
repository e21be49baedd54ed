// Why: metrics.stats_every end to end with the real binary on the tiny config: the precursors land in /stats/ with
// the documented shapes, observing changes no loss or gradient norm (the stats-off run is the reference), an
// observer's on_stats sees the same values on the same steps, the whole model's rows are the same in a TP and a PP
// layout as in one process, an optimizer without second moments is said to have none, the report draws the
// heatmaps and the spike table, and a bad value is refused naming the key. A few steps each: seconds.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "core/metrics/metrics_reader.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

using metrics::MetricsReader;

const std::string kRun = "--set train.steps=4 --set checkpoint.at_end=false --set train.precision=fp32";

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every float of a /stats series, row-major.
std::vector<float> series(const MetricsReader& r, const std::string& name) {
  const std::string path = "/stats/" + name;
  if (r.info(path).shape.size() == 2) return r.read_matrix(path).values;
  std::vector<float> out;
  for (double v : r.read_double(path)) out.push_back(static_cast<float>(v));
  return out;
}

TEST(StatsRun, PrecursorsLandInStatsWithoutChangingTheRun) {
  const std::string off = fresh_dir("stats-off"), on = fresh_dir("stats-on");
  ProcessResult r = run_keel("train " + tiny_args(kRun) + " --run-dir " + off);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train " + tiny_args(kRun) + " --run-dir " + on +
               " --set metrics.stats_every=2 --plugin observers=" + fixture_plugin("stats_recorder"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const MetricsReader a(off + "/metrics.h5"), b(on + "/metrics.h5");
  // Observation only: the same losses and gradient norms, bit for bit.
  EXPECT_EQ(a.read_double("/train/loss"), b.read_double("/train/loss"));
  EXPECT_EQ(a.read_double("/train/grad_norm"), b.read_double("/train/grad_norm"));
  EXPECT_FALSE(a.has_dataset("/stats/step"));
  EXPECT_EQ(read_text(off + "/config.ini").find("stats_every"), std::string::npos);  // off: config.ini unchanged
  EXPECT_NE(read_text(on + "/config.ini").find("stats_every = 2"), std::string::npos);
  // Shapes: tiny.ini has 2 layers of 4 heads; one column per tensor of the model.
  const auto n = static_cast<int64_t>(a.read_matrix("/train/tensor/grad_norm").cols);
  EXPECT_EQ(b.read_int64("/stats/step"), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(b.info("/stats/attn_logit_max").shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(b.info("/stats/block_rms").shape, (std::vector<int64_t>{2, 2}));
  for (const char* scalar : {"logit_mean", "logit_max", "z_mean", "z_max"})
    EXPECT_EQ(b.info(std::string("/stats/") + scalar).shape, (std::vector<int64_t>{2})) << scalar;
  for (const char* per_tensor : {"update_ratio", "sqrt_v_min", "sqrt_v_median", "sqrt_v_max", "v_below_eps"})
    EXPECT_EQ(b.info(std::string("/stats/") + per_tensor).shape, (std::vector<int64_t>{2, n})) << per_tensor;
  for (float v : series(b, "block_rms")) EXPECT_TRUE(std::isfinite(v) && v > 0.0f);
  for (float v : series(b, "update_ratio")) EXPECT_TRUE(std::isfinite(v) && v > 0.0f && v < 1.0f) << v;
  for (float v : series(b, "v_below_eps")) EXPECT_TRUE(v >= 0.0f && v <= 1.0f) << v;
  const auto lo = series(b, "sqrt_v_min"), mid = series(b, "sqrt_v_median"), hi = series(b, "sqrt_v_max");
  for (size_t i = 0; i < lo.size(); ++i) EXPECT_TRUE(lo[i] <= mid[i] && mid[i] <= hi[i]) << i;
  const auto z_mean = series(b, "z_mean"), z_max = series(b, "z_max");
  for (size_t i = 0; i < z_mean.size(); ++i) EXPECT_LE(z_mean[i], z_max[i]);
  // The observer saw the same values, on the stats steps only, after its on_step_end.
  EXPECT_EQ(b.read_int64("/train/extra/stats_recorder.block_rms0_step"), (std::vector<int64_t>{0, 2}));
  const auto seen = b.read_double("/train/extra/stats_recorder.block_rms0");
  const auto rms = b.read_matrix("/stats/block_rms");
  for (int64_t row = 0; row < 2; ++row) EXPECT_FLOAT_EQ(static_cast<float>(seen[row]), rms.at(row, 0));
  EXPECT_EQ(b.read_double("/train/extra/stats_recorder.order"), (std::vector<double>{1.0, 1.0}));
  EXPECT_EQ(b.read_double("/train/extra/stats_recorder.attn_logit_max_n"), (std::vector<double>{8.0, 8.0}));
}

// The whole model's rows in a TP and a PP layout equal the single process's (fp32; reduction order only).
TEST(StatsRun, TensorAndPipelineLayoutsGiveTheSameRows) {
  const std::string flags =
      " --set train.steps=2 --set checkpoint.at_end=false --set train.precision=fp32"
      " --set metrics.stats_every=1";
  const std::string ref = fresh_dir("stats-ref");
  ProcessResult r = run_keel("train " + tiny_args(flags) + " --run-dir " + ref);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const MetricsReader want(ref + "/metrics.h5");
  for (const std::string layout : {"--set parallel.tp=2", "--set parallel.pp=2"}) {
    const std::string dir = fresh_dir(std::string("stats-") + (layout.find("tp") != std::string::npos ? "tp" : "pp"));
    r = run_keel_with_env("", "launch --nproc 2 -- " + std::string(KEEL_BINARY) + " train " + tiny_args(flags) +
                                  " --run-dir " + dir + " " + layout);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const MetricsReader got(dir + "/metrics.h5");
    EXPECT_EQ(got.read_int64("/stats/step"), want.read_int64("/stats/step")) << layout;
    for (const char* name : {"attn_logit_max", "block_rms", "logit_mean", "logit_max", "z_mean", "z_max",
                             "update_ratio", "sqrt_v_min", "sqrt_v_median", "sqrt_v_max", "v_below_eps"}) {
      const auto a = series(want, name), b = series(got, name);
      ASSERT_EQ(a.size(), b.size()) << layout << " " << name;
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT_NEAR(b[i], a[i], 1e-3 * std::abs(a[i]) + 1e-6) << layout << " " << name << "[" << i << "]";
    }
  }
}

// Lion keeps no second moment: its columns are NaN and every stats step says so in an event.
TEST(StatsRun, AnOptimizerWithoutSecondMomentsGetsNaNAndAnEvent) {
  const std::string dir = fresh_dir("stats-lion");
  const ProcessResult r = run_keel("train " + tiny_args("--set train.steps=2 --set checkpoint.at_end=false") +
                                   " --run-dir " + dir + " --set metrics.stats_every=1 --plugin optimizer=lion");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const MetricsReader m(dir + "/metrics.h5");
  for (float v : series(m, "sqrt_v_median")) EXPECT_TRUE(std::isnan(v));
  for (float v : series(m, "update_ratio")) EXPECT_TRUE(std::isfinite(v));  // the rest is still measured
  int said = 0;
  for (const auto& e : m.read_events())
    if (e.kind == "stats" && e.text.find("optimizer lion keeps no <param>/exp_avg_sq") != std::string::npos) ++said;
  EXPECT_EQ(said, 2);
}

// The report of a stats run with a spike: the precursor heatmaps and the spike table are in the data and draw in
// headless Chromium (as tests/integration/test_report.cpp loads pages) with no error.
TEST(StatsRun, TheReportDrawsThePrecursorHeatmapsAndTheSpikeTable) {
  const std::string root = fresh_dir("stats-report"), run = root + "/spiky";
  // lr_spike multiplies the LR at step 12, the loss of step 13 jumps, rollback_skip returns to step 8.
  ProcessResult r = run_keel("train --config " + tiny_config() + " " + test_data_override() +
                             " --set train.steps=16 --set checkpoint.every=8 --set metrics.stats_every=4 --run-dir " +
                             run + " --plugin lr_schedule=" + fixture_plugin("lr_spike") +
                             " --plugin spike_handler=rollback_skip --plugin-arg rollback_skip.threshold=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string page = root + "/report.html";
  r = run_keel("report " + run + " -o " + page);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string html = read_text(page);
  EXPECT_NE(html.find("\"precursors\":{\"attn_logit_max\":[["), std::string::npos) << "heatmap grids in the data";
  EXPECT_NE(html.find("\"detector\":\"rollback_skip\""), std::string::npos) << "the spike table has the rollback";
  EXPECT_NE(html.find("\"precursor_scale\":{\"attn_logit_max\":["), std::string::npos) << "a shared colour scale";
  ASSERT_TRUE(std::filesystem::exists("/usr/bin/chromium")) << "chromium is not installed (scripts/setup.sh)";
  const std::string command =
      "/usr/bin/chromium --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir=" + root +
      "/profile --proxy-server=127.0.0.1:9 --proxy-bypass-list='<-loopback>' " +
      "--virtual-time-budget=10000 --dump-dom file://" + page + " > " + root + "/dom.html 2> " + root + "/chromium.log";
  const int status = std::system(command.c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_text(root + "/chromium.log");
  const std::string dom = read_text(root + "/dom.html");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(dom, m, std::regex(R"re(data-report-errors="([0-9]+)")re"))) << dom.substr(0, 2000);
  EXPECT_EQ(m[1].str(), "0") << dom.substr(0, 4000);
  ASSERT_TRUE(std::regex_search(dom, m, std::regex(R"re(data-charts-drawn="([0-9]+)")re")));
  // 4 curves + per-source loss + the grad-norm heatmap + 2 precursor heatmaps + lineage.
  EXPECT_EQ(m[1].str(), "9");
  EXPECT_NE(dom.find("id=\"spike-rows\""), std::string::npos) << "the spike table is drawn";
}

TEST(StatsRun, ANegativeIntervalIsRefusedNamingTheKey) {
  const ProcessResult r =
      run_keel("train " + tiny_args(kRun) + " --run-dir " + fresh_dir("stats-bad") + " --set metrics.stats_every=-1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("metrics.stats_every must be >= 0"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing

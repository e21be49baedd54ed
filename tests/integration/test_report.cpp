// Why: `keel report` end to end, as a user runs it: two tiny runs named as two arms of one
// seed (one hits a reproducible loss spike, from the lr_spike fixture, that rollback_skip rolls back, so the
// metrics hold rollback and checkpoint events and re-run rows), `keel eval` on both, then the report. The page
// is loaded in headless Chromium (Debian's `chromium`, installed by scripts/setup.sh): no console error, no
// error caught by the page, and every chart drawn. Without chromium the test fails and says how to get it.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "keel_process.h"

using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string find_chromium() {
  for (const char* candidate : {"/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"}) {
    if (fs::exists(candidate)) return candidate;
  }
  return "";
}

struct BrowserResult {
  int exit_code = -1;
  std::string dom;  // the DOM after the page's scripts ran
  std::string stderr_text;
};

// Loads `page` in headless Chromium with the network switched off and returns the DOM and the browser's log.
BrowserResult load_in_chromium(const std::string& chromium, const std::string& page, const std::string& work_dir) {
  const std::string dom_file = work_dir + "/dom.html", log_file = work_dir + "/chromium.log";
  const std::string command = chromium + " --headless --no-sandbox --disable-gpu --no-first-run " +
                              "--user-data-dir=" + work_dir + "/chromium-profile " +
                              "--proxy-server=127.0.0.1:9 --proxy-bypass-list='<-loopback>' " +  // no network
                              "--virtual-time-budget=10000 --enable-logging=stderr --v=0 --dump-dom file://" +
                              fs::absolute(page).string() + " > " + dom_file + " 2> " + log_file;
  BrowserResult r;
  const int status = std::system(command.c_str());
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.dom = read_file(dom_file);
  r.stderr_text = read_file(log_file);
  return r;
}

// Lines of the browser log that report a JavaScript error. Chromium logs console messages as
// `:INFO:CONSOLE:LINE] "text", source: ...` (recent builds no longer put the level in the line, older ones wrote
// `:ERROR:CONSOLE`), so a CONSOLE line counts if it is at ERROR level or mentions an error at all; the page's own
// console.error hook (data-report-errors) catches the rest.
std::vector<std::string> console_errors(const std::string& log) {
  std::vector<std::string> out;
  std::istringstream lines(log);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.find("CONSOLE") == std::string::npos && line.find("Uncaught") == std::string::npos) continue;
    if (line.find("Uncaught") != std::string::npos || line.find(":ERROR:CONSOLE") != std::string::npos ||
        std::regex_search(line, std::regex("error", std::regex::icase))) {
      out.push_back(line);
    }
  }
  return out;
}

std::string body_attribute(const std::string& dom, const std::string& name) {
  const std::regex attr(name + R"(=\"([^\"]*)\")");
  std::smatch m;
  return std::regex_search(dom, m, attr) ? m[1].str() : "<absent>";
}

void expect_page_draws(const std::string& page, const std::string& work_dir, int expected_charts) {
  const std::string chromium = find_chromium();
  ASSERT_FALSE(chromium.empty()) << "chromium is not installed: the report page cannot be checked in a browser. "
                                    "Run scripts/setup.sh (it installs Debian's chromium; CI does the same).";
  const BrowserResult b = load_in_chromium(chromium, page, work_dir);
  ASSERT_EQ(b.exit_code, 0) << b.stderr_text;
  const auto errors = console_errors(b.stderr_text);
  EXPECT_TRUE(errors.empty()) << "console errors:\n" << errors.front();
  EXPECT_EQ(body_attribute(b.dom, "data-report-errors"), "0") << b.dom.substr(0, 2000);
  EXPECT_EQ(body_attribute(b.dom, "data-charts-drawn"), std::to_string(expected_charts));
}

}  // namespace

TEST(ReportRun, TwoArmsWithASpikeRollbackAndEvalDrawInABrowser) {
  const std::string root = fresh_dir("report");
  fs::create_directories(root);
  const std::string base = root + "/base-seed1", lowlr = root + "/lowlr-seed1";
  const std::string common = "train --config " + tiny_config() + " " + test_data_override() +
                             " --set train.steps=16 --set checkpoint.every=8 ";
  // lr_spike multiplies the LR at step 12, the loss of step 13 jumps, rollback_skip returns to step 8.
  auto r =
      run_keel(common + "--run-dir " + base + " --plugin lr_schedule=" + KEEL_TEST_PLUGIN_DIR +
               "/keel_plugin_lr_spike.so --plugin spike_handler=rollback_skip --plugin-arg rollback_skip.threshold=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel(common + "--run-dir " + lowlr + " --set optim.lr=1e-3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const auto& run : {base, lowlr}) {
    r = run_keel("eval " + run + " --batches 1 --memorization-samples 0");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }

  const std::string page = root + "/out/report.html";
  fs::create_directories(root + "/out");
  std::ofstream(page) << "an old report";
  r = run_keel("report " + base + " " + lowlr + " -o " + page + " --title 'Spike A/B'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("2 run(s), 2 arm(s), baseline base"), std::string::npos) << r.output;
  const std::string html = read_file(page);
  EXPECT_NE(html.find("<title>Spike A/B</title>"), std::string::npos);
  EXPECT_NE(html.find("\"kind\":\"rollback\""), std::string::npos) << "the spike's rollback event is in the data";
  EXPECT_NE(html.find("\"eval_loss\""), std::string::npos) << "the A/B table has eval rows";
  EXPECT_EQ(std::distance(fs::directory_iterator(root + "/out"), fs::directory_iterator()), 1) << "no temp file left";
  // Offline: nothing is fetched (no src/href to another origin).
  EXPECT_FALSE(std::regex_search(html, std::regex(R"((src|href)\s*=\s*["']?\s*(https?:)?//)", std::regex::icase)));

  EXPECT_NE(html.find("\"source_loss\":{\"loss\":[["), std::string::npos) << "per-source losses are in the data";
  // 4 curves + per-source loss + eval loss + 2 heatmaps + lineage + A/B chart.
  expect_page_draws(page, root, 10);

  // One run: the A/B section says so, the rest still draws (4 curves + per-source loss + its eval loss + 1 heatmap +
  // lineage).
  const std::string solo = root + "/solo.html";
  r = run_keel("report " + base + " -o " + solo);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("one run only"), std::string::npos) << r.output;
  expect_page_draws(solo, root, 8);
}

TEST(ReportRun, BadArgumentsNameThePathAndExitNonZero) {
  const std::string root = fresh_dir("report-bad");
  fs::create_directories(root + "/not-a-run");
  auto r = run_keel("report " + root + "/nope -o " + root + "/r.html");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find(root + "/nope: no such run directory"), std::string::npos) << r.output;
  r = run_keel("report " + root + "/not-a-run -o " + root + "/r.html");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find(root + "/not-a-run/metrics.h5: missing"), std::string::npos) << r.output;
  r = run_keel("report " + root + "/not-a-run");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("missing -o FILE.html"), std::string::npos) << r.output;
  r = run_keel("report -o " + root + "/r.html");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("at least one RUN_DIR"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(root + "/r.html"));
}

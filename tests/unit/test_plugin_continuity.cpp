// Why: what a plugin carries across a resume or swap must be exact: the lineage's plugin records (path, SHA-256,
// the steps each library was loaded for) round-trip and drive the "library changed" warning, and the history a
// warm start receives is the authoritative row of each step (the replay after a rollback, not the discarded
// row), walked from a run to its parents up to each branch step, newest rows kept, with a clear account of a
// missing or unreadable file.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/metrics/metrics_writer.h"
#include "core/train/plugin_continuity.h"
#include "tests/unit/test_support.h"

using namespace keel;
using keel::checkpoint::Lineage;
using keel::checkpoint::PluginRecord;

namespace {

// A metrics.h5 holding one row per entry of `steps`, with loss = 100 * row index + step (so a test can tell
// which row of a step it got) and grad_norm = step / 10.
void write_metrics(const std::string& path, const std::vector<int64_t>& steps) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  metrics::MetricsWriter writer(path, metrics::OpenMode::kCreate, {}, {}, 1000);
  for (size_t i = 0; i < steps.size(); ++i) {
    metrics::StepRow row;
    row.step = steps[i];
    row.loss = 100.0 * static_cast<double>(i) + static_cast<double>(steps[i]);
    row.grad_norm = static_cast<double>(steps[i]) / 10.0;
    row.skipped = steps[i] == 2;
    writer.append(row);
  }
}

PluginRecord record(const std::string& name, const std::string& path, const std::string& sha, int64_t from,
                    int64_t until) {
  return {"spike_handler", name, "1.0", path, sha, from, until};
}

}  // namespace

TEST(PluginRecords, RoundTripThroughTheLineageAndOldLineagesHaveNone) {
  Lineage l;
  l.run_id = "run-x";
  l.plugins.push_back(record("zscore_skip", "/p/a.so", std::string(64, 'a'), 0, 7));
  l.plugins.push_back(record("lr_cooldown", "/p/b.so", std::string(64, 'b'), 7, -1));
  const Lineage back = checkpoint::parse_lineage(checkpoint::lineage_to_json(l), "t");
  ASSERT_EQ(back.plugins.size(), 2u);
  EXPECT_EQ(back.plugins[0].name, "zscore_skip");
  EXPECT_EQ(back.plugins[0].path, "/p/a.so");
  EXPECT_EQ(back.plugins[0].sha256, std::string(64, 'a'));
  EXPECT_EQ(back.plugins[0].until_step, 7);
  EXPECT_EQ(back.plugins[1].from_step, 7);
  EXPECT_EQ(back.plugins[1].until_step, -1);
  EXPECT_TRUE(checkpoint::parse_lineage(R"({"run_id": "run-old"})", "t").plugins.empty());
  const std::string bad = keel::testing::checkpoint_error_of(
      [] { checkpoint::parse_lineage(R"({"run_id": "r", "plugins": [{"slot": "x", "name": 3}]})", "L"); });
  EXPECT_NE(bad.find("plugins[0].name"), std::string::npos) << bad;
}

TEST(PluginRecords, AChangedLibraryIsNamedOnlyWhenItWasLoadedAtThatStep) {
  const std::vector<PluginRecord> records = {record("zscore_skip", "/p/a.so", "aaaaaaaaaaaaaaaaaaaa", 0, 10),
                                             record("lr_cooldown", "/p/b.so", "bbbbbbbbbbbbbbbbbbbb", 10, -1)};
  const std::vector<std::pair<std::string, std::string>> now = {{"/p/a.so", "cccccccccccccccccccc"},
                                                                {"/p/b.so", "bbbbbbbbbbbbbbbbbbbb"}};
  auto lines = checkpoint::changed_plugin_libraries(records, 5, now, "checkpoint C");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0],
            "plugin zscore_skip (spike_handler): the library /p/a.so has changed since checkpoint C (sha256 "
            "aaaaaaaaaaaaaaaa... then, cccccccccccccccc... now)");
  EXPECT_TRUE(checkpoint::changed_plugin_libraries(records, 12, now, "C").empty()) << "b.so is unchanged";
  lines = checkpoint::changed_plugin_libraries(records, 12, {{"/p/b.so", ""}}, "C");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("unreadable now"), std::string::npos) << lines[0];
  EXPECT_TRUE(checkpoint::changed_plugin_libraries(records, 5, {}, "C").empty()) << "paths not loaded now";
}

TEST(WarmStartHistory, TheReplayedRowOfAStepWinsAndParentsFillInUpToTheBranchStep) {
  const std::string dir = keel::testing::test_dir();
  // Parent: steps 0..5, then a rollback replays 3..5 (rows 6..8); the child branched from its step-4 checkpoint.
  write_metrics(dir + "/parent/metrics.h5", {0, 1, 2, 3, 4, 5, 3, 4, 5});
  write_metrics(dir + "/child/metrics.h5", {4, 5, 6, 7});
  const std::vector<train::HistorySegment> segments = {{dir + "/child/metrics.h5", 7}, {dir + "/parent/metrics.h5", 4}};
  const sdk::WarmStartHistory h = train::read_history(segments, 7);
  EXPECT_EQ(h.start_step, 7);
  ASSERT_EQ(h.rows.size(), 7u);  // steps 0..6
  for (size_t i = 0; i < h.rows.size(); ++i) EXPECT_EQ(h.rows[i].step, static_cast<int64_t>(i));
  EXPECT_EQ(h.rows[3].loss, 603.0) << "the replayed row of step 3 (row 6), not the rolled-back one";
  EXPECT_EQ(h.rows[4].loss, 4.0) << "the child's own step 4 (row 0 of its file)";
  EXPECT_EQ(h.rows[6].loss, 206.0);
  EXPECT_DOUBLE_EQ(h.rows[6].grad_norm, 0.6);
  EXPECT_TRUE(h.rows[2].skipped);
  EXPECT_FALSE(h.rows[1].skipped);
  EXPECT_EQ(h.source, dir + "/child/metrics.h5 steps 4-6; " + dir + "/parent/metrics.h5 steps 0-3");

  const sdk::WarmStartHistory newest = train::read_history(segments, 7, /*max_rows=*/3);
  ASSERT_EQ(newest.rows.size(), 3u);
  EXPECT_EQ(newest.rows.front().step, 4) << "the newest rows are kept";
}

TEST(WarmStartHistory, AMissingFileEndsTheWalkAndSaysSo) {
  const std::string dir = keel::testing::test_dir();
  write_metrics(dir + "/old/metrics.h5", {0, 1, 2});
  const sdk::WarmStartHistory h = train::read_history({{dir + "/gone/metrics.h5", 2}, {dir + "/old/metrics.h5", 2}}, 2);
  EXPECT_TRUE(h.rows.empty()) << "no gap-bridging past an unreadable file";
  EXPECT_NE(h.source.find(dir + "/gone/metrics.h5 unreadable ("), std::string::npos) << h.source;
  EXPECT_EQ(train::read_history({}, 5).source, "no parent run");
}

TEST(WarmStartHistory, SegmentsFollowTheLineageThroughEachAncestorsLineageJson) {
  const std::string dir = keel::testing::test_dir();
  write_metrics(dir + "/a/metrics.h5", {0, 1, 2, 3});
  write_metrics(dir + "/b/metrics.h5", {3, 4, 5});
  Lineage a;
  a.run_id = "run-a";
  a.run_dir = dir + "/a";
  checkpoint::write_file_atomically(dir + "/a/lineage.json", checkpoint::lineage_to_json(a));
  Lineage b;
  b.run_id = "run-b";
  b.run_dir = dir + "/b";
  b.parent_run_id = "run-a";
  b.parent_checkpoint = dir + "/a/checkpoints/step-00000003";
  b.parent_step = 3;
  checkpoint::write_file_atomically(dir + "/b/lineage.json", checkpoint::lineage_to_json(b));
  Lineage c;  // resumed from b's step-5 checkpoint, but b's run dir is named only in the lineage
  c.run_id = "run-c";
  c.parent_run_id = "run-b";
  c.parent_run_dir = dir + "/b";
  c.parent_checkpoint = dir + "/moved/checkpoints/step-00000005";
  c.parent_step = 5;
  const auto segments = train::history_segments(c, "", 5);
  ASSERT_EQ(segments.size(), 2u);
  EXPECT_EQ(segments[0].metrics_path, dir + "/b/metrics.h5");
  EXPECT_EQ(segments[0].before_step, 5);
  EXPECT_EQ(segments[1].metrics_path, dir + "/a/metrics.h5");
  EXPECT_EQ(segments[1].before_step, 3);
  const sdk::WarmStartHistory h = train::read_history(segments, 5);
  ASSERT_EQ(h.rows.size(), 5u);
  EXPECT_EQ(h.rows[2].loss, 202.0);  // a's row 2
  EXPECT_EQ(h.rows[4].loss, 104.0);  // b's row 1 (step 4)
  const auto own = train::history_segments(c, dir + "/c/metrics.h5", 9);
  ASSERT_EQ(own.size(), 3u);
  EXPECT_EQ(own[0].before_step, 9);
}

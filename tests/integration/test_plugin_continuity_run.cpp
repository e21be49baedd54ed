// Why: a plugin that joins a run at a resume must neither start blind nor run other code than the record says.
// Through the real `keel` binary: a zscore_skip added at a resume one step before a spike (the lr_spike fixture)
// warm starts from the parent's metrics.h5 and skips the spike (a `warm_start` event names it and the rows);
// with the parent's history gone it says, as a warning event and log line, how long it is inactive; every
// checkpoint's lineage records each plugin library with its SHA-256, and replacing the library file behind a
// path makes the resume warn naming the plugin (a `keel control` swap too, and the swapped-in handler warm starts
// from the run's own rows); and the progress line numbers steps as metrics.h5 does.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <string>
#include <thread>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/sha256.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using namespace keel::checkpoint;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

std::string builtin(const std::string& name) {
  return std::string(KEEL_TEST_PLUGIN_DIR) + "/../lib/keel/plugins/keel_plugin_" + name + ".so";  // the build's
}
std::vector<keel::metrics::Event> events_of(const std::string& run, const std::string& kind) {
  std::vector<keel::metrics::Event> out;
  for (const auto& e : MetricsReader(run + "/metrics.h5").read_events()) {
    if (e.kind == kind) out.push_back(e);
  }
  return out;
}

// A base run of 13 steps whose LR is multiplied by 300 at step 12 (lr_spike), so the loss of step 13 jumps;
// it ends with checkpoint step-00000013, the state just before the spike. No spike handler.
std::string spiking_base(const std::string& name) {
  const std::string base = fresh_dir(name);
  const auto r = run_keel("train " + tiny_args("--set train.steps=13") + " --run-dir " + base +
                          " --plugin lr_schedule=" + fixture_plugin("lr_spike"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return base;
}

}  // namespace

TEST(PluginContinuity, ZscoreSkipAddedAtAResumeJustBeforeASpikeWarmStartsAndSkipsIt) {
  const std::string base = spiking_base("warm-base"), branch = fresh_dir("warm-branch");
  const auto r = run_keel("resume --from " + base + "/checkpoints/step-00000013 --run-dir " + branch +
                          " --set train.steps=16 --plugin spike_handler=zscore_skip "
                          "--plugin-arg zscore_skip.threshold=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto warm = events_of(branch, "warm_start");
  ASSERT_EQ(warm.size(), 1u) << r.output;
  EXPECT_EQ(warm[0].step, 13);
  EXPECT_EQ(warm[0].text.rfind("[zscore_skip] 13 rows of history before step 13 from ", 0), 0u) << warm[0].text;
  EXPECT_NE(warm[0].text.find("metrics.h5 steps 0-12"), std::string::npos) << warm[0].text;
  EXPECT_TRUE(events_of(branch, "warning").empty()) << r.output;
  MetricsReader reader(branch + "/metrics.h5");
  const auto steps = reader.read_int64("/train/step");
  const auto skipped = reader.read_int64("/train/skipped");
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0], 13);
  EXPECT_EQ(skipped[0], 1) << "the spike of step 13 was let through: " << r.output;
  const Lineage lineage = parse_lineage(read_small_file(branch + "/lineage.json"), "lineage.json");
  bool noted = false;
  for (const auto& n : lineage.notes) noted = noted || n.rfind("warm start: [zscore_skip] 13 rows", 0) == 0;
  EXPECT_TRUE(noted) << read_small_file(branch + "/lineage.json");
}

TEST(PluginContinuity, WithoutTheParentsHistoryTheHandlerSaysHowLongItIsInactive) {
  const std::string base = spiking_base("cold-base"), branch = fresh_dir("cold-branch");
  fs::remove(base + "/metrics.h5");
  const auto r = run_keel("resume --from " + base + "/checkpoints/step-00000013 --run-dir " + branch +
                          " --set train.steps=14 --plugin spike_handler=zscore_skip "
                          "--plugin-arg zscore_skip.min_history=6");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(events_of(branch, "warm_start").empty());
  const auto warnings = events_of(branch, "warning");
  ASSERT_EQ(warnings.size(), 1u) << r.output;
  EXPECT_EQ(warnings[0].step, 13);
  const std::string expected = "[zscore_skip] no history to warm start from (";
  EXPECT_EQ(warnings[0].text.rfind(expected, 0), 0u) << warnings[0].text;
  EXPECT_NE(warnings[0].text.find("unreadable"), std::string::npos) << warnings[0].text;
  EXPECT_NE(warnings[0].text.find("): inactive for the first 6 steps (steps 13-18)"), std::string::npos)
      << warnings[0].text;
  EXPECT_NE(r.output.find("inactive for the first 6 steps (steps 13-18)"), std::string::npos) << r.output;
  EXPECT_EQ(MetricsReader(branch + "/metrics.h5").read_int64("/train/skipped").at(0), 0) << "blind: let through";
}

TEST(PluginContinuity, CheckpointsRecordEachLibrarysHashAndAReplacedLibraryIsNamedAtResume) {
  const std::string dir = fresh_dir("plugin-hash"), run = dir + "/run", resumed = dir + "/resumed";
  fs::create_directories(dir + "/lib");
  const std::string copy = dir + "/lib/handler.so";
  fs::copy_file(builtin("zscore_skip"), copy);
  const std::string hash = sha256_file(copy);
  auto r =
      run_keel("train " + tiny_args("--set train.steps=3") + " --run-dir " + run + " --plugin spike_handler=" + copy);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The run's lineage and the checkpoint's (manifest and rank file carry the same text) name the copy.
  for (const std::string& text :
       {read_small_file(run + "/lineage.json"),
        parse_manifest(read_small_file(run + "/checkpoints/step-00000003/manifest.json"), "manifest").lineage}) {
    const Lineage l = parse_lineage(text, "lineage");
    bool found = false;
    for (const auto& p : l.plugins) {
      if (p.slot != "spike_handler") continue;
      found = true;
      EXPECT_EQ(p.name, "zscore_skip");
      EXPECT_EQ(p.version, "1.0");
      EXPECT_EQ(p.path, copy);
      EXPECT_EQ(p.sha256, hash);
      EXPECT_EQ(p.from_step, 0);
      EXPECT_EQ(p.until_step, -1);
    }
    EXPECT_TRUE(found) << text;
    EXPECT_GE(l.plugins.size(), 2u) << "the optimizer is recorded too";
  }
  // Unchanged library: no warning.
  r = run_keel("resume --from " + run + " --run-dir " + dir + "/same --set train.steps=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("has changed since"), std::string::npos) << r.output;

  // Another library at the same path (as a rebuild would leave it): the resume names the plugin and the file.
  fs::copy_file(builtin("lr_cooldown"), copy + ".new");
  fs::rename(copy + ".new", copy);
  r = run_keel("resume --from " + run + " --run-dir " + resumed + " --set train.steps=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string line = "plugin zscore_skip (spike_handler): the library " + copy + " has changed since checkpoint ";
  EXPECT_NE(r.output.find(line), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(sha256 " + hash.substr(0, 16) + "... then, "), std::string::npos) << r.output;
  const auto warnings = events_of(resumed, "warning");
  ASSERT_FALSE(warnings.empty());
  EXPECT_EQ(warnings[0].text.rfind(line, 0), 0u) << warnings[0].text;
  const Lineage l = parse_lineage(read_small_file(resumed + "/lineage.json"), "lineage.json");
  bool noted = false;
  for (const auto& n : l.notes) noted = noted || n.rfind(line, 0) == 0;
  EXPECT_TRUE(noted);
  for (const auto& p : l.plugins) {
    if (p.slot == "spike_handler") {
      EXPECT_EQ(p.from_step, 3) << "recorded from the step the resume starts at";
    }
  }
}

TEST(PluginContinuity, TheProgressLineNumbersStepsAsMetricsDo) {
  const std::string run = fresh_dir("numbering");
  const auto r = run_keel("train " + tiny_args("--set train.steps=5 --set train.log_every=2") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::regex progress(R"(step (\d+) \((\d+)/5\) \| loss)");
  std::vector<int64_t> logged;
  for (auto it = std::sregex_iterator(r.output.begin(), r.output.end(), progress); it != std::sregex_iterator(); ++it) {
    logged.push_back(std::stoll((*it)[1]));
    EXPECT_EQ(std::stoll((*it)[2]), std::stoll((*it)[1]) + 1) << it->str();
  }
  ASSERT_EQ(logged, (std::vector<int64_t>{1, 3, 4})) << r.output;  // every 2nd step and the last, from 0
  const auto steps = MetricsReader(run + "/metrics.h5").read_int64("/train/step");
  ASSERT_FALSE(steps.empty());
  EXPECT_EQ(logged.back(), steps.back()) << "the last progress line names the last metrics row's step";
  EXPECT_EQ(steps.front(), 0);
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step-00000005")) << "step-N: the state after N steps";
}

TEST(PluginContinuity, ASwapToARebuiltLibraryIsRefusedNamingItAndANewHandlerWarmStartsFromTheRunsOwnRows) {
  const std::string dir = fresh_dir("swap-hash"), run = dir + "/run";
  fs::create_directories(dir + "/lib");
  const std::string copy = dir + "/lib/handler.so", cooldown = dir + "/lib/cooldown.so";
  fs::copy_file(builtin("zscore_skip"), copy);
  fs::copy_file(builtin("lr_cooldown"), cooldown);
  const pid_t pid =
      spawn_keel("train " + tiny_args("--set train.steps=8") + " --run-dir " + run + " --plugin spike_handler=" + copy);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(run + "/metrics.h5") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  // A rebuild replaces the file behind the loaded path (a new inode: the running trainer keeps its mapping).
  fs::copy_file(builtin("lr_cooldown"), copy + ".new");
  fs::rename(copy + ".new", copy);
  auto ctl = run_keel("control " + run + " swap spike_handler=" + copy + " --at-step 5");
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  ctl = run_keel("control " + run + " swap spike_handler=" + cooldown + " --at-step 6");
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  const std::string line =
      "plugin zscore_skip (spike_handler): the library " + copy + " has changed since this run loaded it (sha256 " +
      sha256_file(builtin("zscore_skip")).substr(0, 16) + "... then, " + sha256_file(copy).substr(0, 16) + "... now)";
  const auto warnings = events_of(run, "warning");
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_EQ(warnings[0].step, 5);
  EXPECT_EQ(warnings[0].text, line);
  EXPECT_EQ(warnings[1].step, 6);  // 6 rows of a default min_history of 10
  EXPECT_EQ(warnings[1].text, "[lr_cooldown] too little history (" + run +
                                  "/metrics.h5 steps 0-5): inactive for the first 4 steps (steps 6-9)");
  const auto refused = events_of(run, "plugin_swap_refused");
  ASSERT_EQ(refused.size(), 1u);
  EXPECT_EQ(refused[0].step, 5);
  EXPECT_NE(refused[0].text.find("copy the new library to another path"), std::string::npos) << refused[0].text;
  // The second request loads a library from a new path: applied, and the new handler gets steps 0-5.
  const auto warm = events_of(run, "warm_start");
  ASSERT_EQ(warm.size(), 1u);
  EXPECT_EQ(warm[0].step, 6);
  EXPECT_EQ(warm[0].text, "[lr_cooldown] 6 rows of history before step 6 from " + run + "/metrics.h5 steps 0-5");
  const Lineage l = parse_lineage(read_small_file(run + "/lineage.json"), "lineage.json");
  std::vector<std::string> handlers;
  for (const auto& p : l.plugins) {
    if (p.slot == "spike_handler")
      handlers.push_back(p.name + " " + std::to_string(p.from_step) + ".." + std::to_string(p.until_step));
  }
  EXPECT_EQ(handlers, (std::vector<std::string>{"zscore_skip 0..6", "lr_cooldown 6..-1"}));
}

// Why: the data-order promise, checked end to end through the `keel` binary: every step's samples are recorded in
// metrics.h5 (/data/batch), and `keel data show-batch --run` reconstructs, from the run's lineage and checkpoints
// alone, exactly those samples for every step of a run that branched with a new mixture, had its mixture plugin
// swapped mid-run and rolled back after a loss spike; `keel data compare-order` reports how paired two arms
// branched from one checkpoint are; and prepared data numbers its documents so that a sample names them.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/checkpoint/durable_fs.h"
#include "core/config/config.h"
#include "core/data/documents.h"
#include "core/data/loader.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using nlohmann::json;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

// show-batch --run RUN --step FIRST --to LAST --json, by step.
std::map<int64_t, json> shown(const std::string& run, int64_t first, int64_t last) {
  const auto r = run_keel("data show-batch --run " + run + " --step " + std::to_string(first) + " --to " +
                          std::to_string(last) + " --json --tokens 4");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::map<int64_t, json> out;
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("{", 0) != 0) continue;
    const json j = json::parse(line);
    out[j.at("step").get<int64_t>()] = j;
  }
  return out;
}

// Expects the shown batch of `step` to be the one `run` recorded for it (its last block).
void expect_recorded(const std::string& run, int64_t step, const json& shown_step) {
  const MetricsReader reader(run + "/metrics.h5");
  const auto names = reader.batch_sources();
  const auto recorded = reader.read_batches_by_step();
  ASSERT_TRUE(recorded.count(step)) << run << " recorded no batch for step " << step;
  const auto& rows = recorded.at(step);
  const json& samples = shown_step.at("samples");
  ASSERT_EQ(samples.size(), rows.size()) << "step " << step;
  for (size_t k = 0; k < rows.size(); ++k) {
    const json& s = samples[k];
    const auto& row = rows[k];
    const std::string where = run + " step " + std::to_string(step) + " slot " + std::to_string(k);
    EXPECT_EQ(s.at("source"), names.at(static_cast<size_t>(row.source))) << where;
    EXPECT_EQ(s.at("sample_id"), row.sample_id) << where;
    EXPECT_EQ(s.at("epoch"), row.epoch) << where;
    EXPECT_EQ(s.at("chunk"), row.chunk) << where;
    EXPECT_EQ(s.at("first_doc"), row.first_doc) << where;
    EXPECT_EQ(s.at("first_doc_offset"), row.first_doc_offset) << where;
    EXPECT_EQ(s.at("n_docs"), row.n_docs) << where;
    EXPECT_GE(row.first_doc, 0) << where << ": no document recorded";
    EXPECT_EQ(s.at("tokens").size(), 4u) << where;
  }
}

int count_events(const std::string& run, const std::string& kind) {
  int n = 0;
  for (const auto& e : MetricsReader(run + "/metrics.h5").read_events()) n += e.kind == kind ? 1 : 0;
  return n;
}

json parse_json_output(const std::string& output) {
  const size_t brace = output.find('{');
  if (brace == std::string::npos) return json();
  return json::parse(output.substr(brace), nullptr, /*allow_exceptions=*/false);
}

}  // namespace

TEST(BatchRecord, PreparedDataNumbersItsDocuments) {
  const keel::Config config = keel::load_config(tiny_config(), {std::string("data.dir=") + KEEL_TEST_DATA_DIR});
  const keel::data::DataLoader loader(config, config.global_batch());
  const keel::data::DocumentIndex index(loader.dir(), loader.source_names());
  EXPECT_EQ(index.missing(), "");
  const int64_t T = loader.seq_len();
  for (int32_t source = 0; source < static_cast<int32_t>(loader.source_names().size()); ++source) {
    EXPECT_EQ(index.document_start(source, 0), 0);
    // Every document but the first starts right after an EOS (the previous document's last token).
    for (int64_t doc = 1; doc < 40; ++doc) {
      const int64_t start = index.document_start(source, doc);
      ASSERT_GT(start, 0) << loader.source_names()[source] << " doc " << doc;
      const int64_t eos_at = start - 1;
      const auto window = loader.sample_tokens(source, eos_at / T);
      EXPECT_EQ(window.at(static_cast<size_t>(eos_at % T)), loader.eos_id())
          << loader.source_names()[source] << " doc " << doc;
      const keel::data::DocSpan span = index.span(source, start, 1);
      EXPECT_EQ(span.first_doc, doc);
      EXPECT_EQ(span.first_doc_offset, 0);
    }
  }
}

TEST(BatchRecord, DataPreparedWithoutADocumentIndexWarnsThenPrepareAddsIt) {
  // Data as an older Keel prepared it: no documents.bin, no document_index in prepared.json.
  const std::string data = fresh_dir("old-data"), run = fresh_dir("old-data-run");
  fs::copy(KEEL_TEST_DATA_DIR, data, fs::copy_options::recursive);
  json prepared = json::parse(keel::checkpoint::read_small_file(data + "/prepared.json"));
  const std::string fingerprint = prepared.at("fingerprint");
  for (auto& source : prepared.at("sources")) {
    source.erase("document_index");
    fs::remove(data + "/" + source.at("name").get<std::string>() + "/documents.bin");
  }
  std::ofstream(data + "/prepared.json") << prepared.dump(2);
  const std::string on_old_data =
      "--config " + tiny_config() + " --set data.dir=" + data + " --set train.steps=2 --set checkpoint.every=0";
  auto r = run_keel("train " + on_old_data + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("no document index for source(s) prose, code"), std::string::npos) << r.output;
  for (const auto& row : MetricsReader(run + "/metrics.h5").read_batch()) {
    EXPECT_EQ(row.first_doc, -1);
    EXPECT_EQ(row.n_docs, 0);
  }
  // prepare notices, tokenizes again (same tokens: the fingerprint checkpoints record is unchanged), adds it.
  r = run_keel("data prepare --config " + tiny_config() + " --set data.dir=" + data);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("source prose: prepared data incomplete: no document index (prepared by an older Keel); "
                          "preparing this source again"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(json::parse(keel::checkpoint::read_small_file(data + "/prepared.json")).at("fingerprint"), fingerprint);
  EXPECT_TRUE(fs::exists(data + "/prose/documents.bin"));
  r = run_keel("data show-batch --run " + run + " --step 1 --json --set data.dir=" + data);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_GE(parse_json_output(r.output).at("samples").at(0).at("first_doc").get<int64_t>(), 0) << r.output;
}

TEST(BatchRecord, ShowBatchRunEqualsTheRecordOfABranchedSwappedRolledBackRun) {
  const std::string base = fresh_dir("order-base"), branch = fresh_dir("order-branch");
  auto r = run_keel("train " + tiny_args("--set train.steps=8 --set checkpoint.every=4") + " --run-dir " + base);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The branch: a new mixture from step 4; a loss spike (LR x300 at step 12, again on every replay) that
  // rollback_skip answers three times by rolling back to step 12 and skipping the samples (then it only skips
  // updates); and a data_mixture plugin swapped in through `keel control` for the boundary before step 10 (the
  // trainer is paused while it is requested).
  const pid_t pid = spawn_keel(
      "resume --from " + base + "/checkpoints/step-00000004 --run-dir " + branch + " " + test_data_override() +
      " --set data.mixture=prose=0.3,code=0.7 --set train.steps=20 --set checkpoint.every=4 --plugin lr_schedule=" +
      fixture_plugin("lr_spike") + " --plugin-arg lr_spike.at_step=12 --plugin-arg lr_spike.once=false" +
      " --plugin spike_handler=rollback_skip --plugin-arg rollback_skip.threshold=4 --plugin-arg " +
      "rollback_skip.min_history=4 --plugin-arg rollback_skip.skip=samples");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(branch + "/metrics.h5") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  const auto ctl = run_keel("control " + branch +
                            " swap data_mixture=static --plugin-arg static.weights=prose=0.8,code=0.2 --at-step 10");
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "resume failed";
  EXPECT_EQ(count_events(branch, "rollback"), 3);
  EXPECT_EQ(count_events(branch, "plugin_swap"), 1);
  // Rows of rolled-back steps stay in the record (a re-run step's later block is the one that counts).
  EXPECT_GT(MetricsReader(branch + "/metrics.h5").read_batch().size(), 16u * 16u);

  // Every step, the parent's before the branch point included, equals the record.
  const auto steps = shown(branch, 0, 19);
  ASSERT_EQ(steps.size(), 20u);
  for (const auto& [step, j] : steps) expect_recorded(step < 4 ? base : branch, step, j);
  // The branch's three mixtures are all in there: 0.3/0.7 from step 4, 0.8/0.2 from step 10.
  auto prose_share = [&](int64_t first, int64_t last) {
    double prose = 0, all = 0;
    for (int64_t s = first; s <= last; ++s) {
      for (const auto& sample : steps.at(s).at("samples")) {
        prose += sample.at("source") == "prose" ? 1 : 0;
        all += 1;
      }
    }
    return prose / all;
  };
  EXPECT_LT(prose_share(4, 9), 0.5);
  EXPECT_GT(prose_share(10, 19), 0.6);

  // The parent checkpoint pruned away: the branch's own checkpoints (12, 16, 20: retention keeps the newest three)
  // still give every later step exactly; a step before the first of them is an error naming the missing one.
  fs::rename(base + "/checkpoints/step-00000004", base + "/step-00000004.moved");
  const auto later = shown(branch, 12, 19);
  ASSERT_EQ(later.size(), 8u);
  for (const auto& [step, j] : later) EXPECT_EQ(j, steps.at(step)) << "step " << step;
  const auto gone = run_keel("data show-batch --run " + branch + " --step 6");
  EXPECT_NE(gone.exit_code, 0);
  EXPECT_NE(gone.output.find(base + "/checkpoints/step-00000004 (lineage.json), which is gone"), std::string::npos)
      << gone.output;
}

TEST(BatchRecord, CompareOrderOfTwoArmsBranchedFromOneCheckpoint) {
  const std::string base = fresh_dir("pair-base"), arm_a = fresh_dir("pair-a"), arm_b = fresh_dir("pair-b");
  auto r = run_keel("train " + tiny_args("--set train.steps=4 --set checkpoint.every=4") + " --run-dir " + base);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string from = "resume --from " + base + "/checkpoints/step-00000004 " + test_data_override() +
                           " --set train.steps=20 --set checkpoint.every=0 --run-dir ";
  r = run_keel(from + arm_a);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel(from + arm_b + " --set data.mixture=prose=0.3,code=0.7");
  ASSERT_EQ(r.exit_code, 0) << r.output;

  r = run_keel("data compare-order " + arm_a + " " + arm_b + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = parse_json_output(r.output);
  ASSERT_TRUE(j.is_object()) << r.output;
  EXPECT_EQ(j.at("branch_step"), 4);
  EXPECT_EQ(j.at("slots"), 16 * 16);
  EXPECT_NEAR(j.at("expected_same_source_share").get<double>(), 0.8, 1e-9);
  EXPECT_NEAR(j.at("same_source_share").get<double>(), 0.8, 0.1) << r.output;
  int64_t same = 0;
  for (const char* name : {"prose", "code"}) {
    const json& s = j.at("sources").at(name);
    EXPECT_LE(s.at("same_sample").get<int64_t>(), s.at("same_source").get<int64_t>());
    same += s.at("same_source").get<int64_t>();
  }
  EXPECT_NEAR(static_cast<double>(same) / (16 * 16), j.at("same_source_share").get<double>(), 1e-12);

  r = run_keel("data compare-order " + arm_a + " " + arm_b + " --steps 10..11 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(parse_json_output(r.output).at("slots"), 32);
  r = run_keel("data compare-order " + arm_a + " " + arm_a);  // an arm with itself: every slot the same
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("same source: 1 of slots"), std::string::npos) << r.output;
}

TEST(BatchRecord, BadArgumentsAreOneLineErrors) {
  const std::string not_a_run = fresh_dir("not-a-run");
  fs::create_directories(not_a_run);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"data compare-order " + not_a_run, "expected two run directories, got 1"},
      {"data compare-order " + not_a_run + " " + not_a_run, "no lineage.json"},
      {"data compare-order a b --steps 5..2", "--steps '5..2': expected S..E"},
      {"data show-batch --run " + not_a_run + " --step 0", not_a_run + ": no lineage.json"},
      {"data show-batch --run " + not_a_run + " --config " + tiny_config() + " --step 0",
       "give exactly one of --config or --run"},
      {"data show-batch --config " + tiny_config() + " " + test_data_override() + " --step 3 --to 2",
       "--to 2 is before --step"},
  };
  for (const auto& [command, message] : cases) {
    const auto result = run_keel(command);
    EXPECT_NE(result.exit_code, 0) << command;
    EXPECT_NE(result.output.find(message), std::string::npos) << command << "\n" << result.output;
    EXPECT_EQ(std::count(result.output.begin(), result.output.end(), '\n'), 1) << command << "\n" << result.output;
  }
  const auto help = run_keel("data compare-order --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.output.find("--steps"), std::string::npos) << help.output;
}

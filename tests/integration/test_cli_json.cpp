// Why: scripts (bench/, experiments/) read Keel through `--json`, never through the human text, so every JSON
// object docs/cli.md documents is checked here by parsing the real binary's output with nlohmann::json: `keel
// config show|keys`, `keel plugins`, `keel inspect` (run dir, checkpoint, several runs) and `keel report` (the
// A/B table with its statistics, checked against the values it reports). Also: every subcommand answers
// --help with exit 0, and a usage error is one line with a non-zero exit.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "keel_process.h"

using namespace keel::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// Runs keel and parses its stdout (stderr is dropped: a log line there must not be taken for JSON; stdout must
// hold the JSON object and nothing else).
json keel_json(const std::string& arguments) {
  const std::string command = std::string(KEEL_BINARY) + " " + arguments + " 2>/dev/null";
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    ADD_FAILURE() << "cannot run " << command;
    return json();
  }
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) output.append(buffer.data(), n);
  const int status = pclose(pipe);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << command << "\n" << output;
  try {
    return json::parse(output);
  } catch (const json::exception& e) {
    ADD_FAILURE() << command << ": not JSON (" << e.what() << "):\n" << output;
    return json();
  }
}

void train(const std::string& run_dir, const std::string& extra) {
  const ProcessResult r =
      run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir + " " + extra);
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

size_t count_lines(const std::string& text) {
  size_t lines = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) lines += line.empty() ? 0 : 1;
  return lines;
}

}  // namespace

TEST(CliJson, EverySubcommandHasHelp) {
  // clang-format off
  for (const std::string command : {"train", "resume", "plugins", "control", "data", "data prepare", "data show-batch",
                                    "inspect", "config", "config keys", "config show", "data compare-order", "launch",
                                    "export-hf", "import-hf", "eval", "report", "score", "verify", "tournament", "forensics"}) {
    // clang-format on
    const ProcessResult r = run_keel(command + " --help");
    EXPECT_EQ(r.exit_code, 0) << "keel " << command << " --help\n" << r.output;
    EXPECT_NE(r.output.find("--help"), std::string::npos) << "keel " << command << " --help\n" << r.output;
  }
}

TEST(CliJson, UsageErrorsAreOneLineAndNonZero) {
  // clang-format off
  const std::vector<std::string> commands = {
      "inspect --bogus", "inspect", "plugins extra", "plugins --bogus", "config", "config bogus",
      "config show --bogus", "config keys --bogus", "data", "data bogus", "data prepare --bogus", "report",
      "report x --bogus", "export-hf only-one", "import-hf", "config show --config", "train", "resume", "control",
      "control x swap", "eval", "data show-batch --bogus", "data compare-order", "launch", "launch --nproc 0 -- true",
      "score x --bogus", "verify --bogus", "tournament", "tournament --bogus", "forensics", "forensics --bogus"};
  // clang-format on
  for (const std::string& command : commands) {
    const ProcessResult r = run_keel(command);
    EXPECT_NE(r.exit_code, 0) << "keel " << command << "\n" << r.output;
    EXPECT_EQ(count_lines(r.output), 1u) << "keel " << command << "\n" << r.output;
    const std::string name = command.substr(0, command.find(' '));
    EXPECT_EQ(r.output.rfind("keel " + name + ": error: ", 0), 0u) << "keel " << command << "\n" << r.output;
  }
}

TEST(CliJson, ConfigShowIsTypedAndNested) {
  const json j = keel_json("config show --config " + tiny_config() +
                           " --set train.steps=7 --set optim.lr=0.002 --plugin-arg zscore_skip.threshold=4 --json");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("file"), tiny_config());
  const json& c = j.at("config");
  EXPECT_EQ(c.at("train").at("steps"), 7);
  EXPECT_TRUE(c.at("train").at("steps").is_number_integer());
  EXPECT_DOUBLE_EQ(c.at("optim").at("lr").get<double>(), 0.002);
  EXPECT_EQ(c.at("model").at("norm"), "rmsnorm");
  EXPECT_EQ(c.at("model").at("tie_embeddings"), false);
  EXPECT_EQ(c.at("model").at("rope_theta"), 10000);
  EXPECT_EQ(c.at("data").at("mixture"), "prose=0.5,code=0.5");
  EXPECT_TRUE(c.at("data").at("seed").is_number_unsigned());
  EXPECT_EQ(c.at("source").at("prose").at("inputs"), json::array({"/usr/share/games/fortunes"}));
  EXPECT_EQ(c.at("source").at("code").at("include"), "*.py");
  EXPECT_DOUBLE_EQ(c.at("source").at("code").at("max_mb").get<double>(), 3.0);
  EXPECT_EQ(c.at("plugin").at("zscore_skip").at("threshold"), "4");
  EXPECT_EQ(c.at("plugins").at("optimizer"), "adamw");

  // The text output is unchanged: an INI with the same values.
  const ProcessResult text = run_keel("config show --config " + tiny_config() + " --set train.steps=7");
  ASSERT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("[train]\nsteps = 7\n"), std::string::npos) << text.output;

  const json keys = keel_json("config keys --json");
  ASSERT_TRUE(keys.at("keys").is_array());
  bool found = false;
  for (const auto& k : keys.at("keys")) found = found || (k.at("key") == "model.layers" && !k.at("doc").empty());
  EXPECT_TRUE(found) << keys.dump(2);
}

TEST(CliJson, PluginsListsTheBuiltIns) {
  const json j = keel_json("plugins --json");
  ASSERT_TRUE(j.at("search_path").is_array());
  EXPECT_FALSE(j.at("search_path").empty());
  ASSERT_TRUE(j.at("unusable").is_array());
  bool adamw = false, zscore = false;
  for (const auto& p : j.at("plugins")) {
    EXPECT_TRUE(p.at("version").is_string() && p.at("description").is_string() && p.at("path").is_string());
    if (p.at("name") == "adamw") adamw = p.at("slots") == json::array({"optimizer"});
    if (p.at("name") == "zscore_skip") zscore = p.at("slots") == json::array({"spike_handler"});
  }
  EXPECT_TRUE(adamw && zscore) << j.dump(2);
}

TEST(CliJson, InspectRunCheckpointAndLineage) {
  const std::string root = fresh_dir("cli-json-inspect");
  const std::string run = root + "/base", branch = root + "/branch";
  train(run, "--set train.steps=10 --set checkpoint.every=5");

  const json r = keel_json("inspect " + run + " --json");
  EXPECT_EQ(r.at("kind"), "run");
  EXPECT_EQ(r.at("dir"), run);
  EXPECT_EQ(r.at("config").at("train.steps"), "10");
  const json& m = r.at("metrics");
  EXPECT_EQ(m.at("rows"), 10);
  EXPECT_EQ(m.at("first_step"), 0);
  EXPECT_EQ(m.at("last_step"), 9);
  EXPECT_GT(m.at("tokens").get<int64_t>(), 0);
  EXPECT_GT(m.at("tokens_per_s").at("median").get<double>(), 0.0);
  EXPECT_EQ(m.at("tokens_per_s").at("warmup_steps"), 5);
  EXPECT_LE(m.at("loss").at("min").get<double>(), m.at("loss").at("first").get<double>());
  EXPECT_GT(m.at("grad_norm").at("max").get<double>(), 0.0);
  bool saw_run_end = false;
  for (const auto& e : r.at("events")) saw_run_end = saw_run_end || e.at("kind") == "run_end";
  EXPECT_TRUE(saw_run_end) << r.dump(2);
  EXPECT_EQ(r.at("run_end").at("steps_run"), 10);
  EXPECT_TRUE(r.at("run_end").at("peak_cuda_memory_bytes").is_null());  // a CPU run
  EXPECT_EQ(r.at("lineage").at("kind"), "root");
  ASSERT_EQ(r.at("checkpoints").size(), 2u) << r.dump(2);
  EXPECT_EQ(r.at("checkpoints")[0].at("step"), 5);
  EXPECT_EQ(r.at("checkpoints")[1].at("valid"), true);
  EXPECT_EQ(r.at("checkpoints")[1].at("latest"), true);
  EXPECT_TRUE(r.at("checkpoints")[1].at("error").is_null());

  // The text output still says the same things.
  const ProcessResult text = run_keel("inspect " + run);
  ASSERT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("metrics: 10 steps (0 .. 9)"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("tokens/s: median"), std::string::npos) << text.output;

  const std::string ckpt = run + "/checkpoints/step-00000010";
  const json c = keel_json("inspect " + ckpt + " --json");
  EXPECT_EQ(c.at("kind"), "checkpoint");
  EXPECT_EQ(c.at("step"), 10);
  EXPECT_EQ(c.at("verified"), true);
  EXPECT_EQ(c.at("layout"), json({{"dp", 1}, {"tp", 1}, {"pp", 1}}));
  EXPECT_EQ(c.at("optimizer").at("name"), "adamw");
  EXPECT_EQ(c.at("optimizer").at("step"), 10);
  EXPECT_EQ(c.at("data_ledger").at("step"), 10);
  EXPECT_FALSE(c.at("files").empty());
  bool embedding = false;
  for (const auto& t : c.at("tensors")) {
    if (t.at("group") == "/model" && t.at("shape").size() == 2 && t.at("shape")[0] == 2048) embedding = true;
  }
  EXPECT_TRUE(embedding) << c.at("tensors").dump();

  const ProcessResult resumed =
      run_keel("resume --from " + ckpt + " --run-dir " + branch + " --set train.steps=12 " + "--set optim.lr=1e-3");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  const json l = keel_json("inspect " + run + " " + branch + " --json");
  EXPECT_EQ(l.at("kind"), "lineage");
  ASSERT_EQ(l.at("runs").size(), 2u);
  EXPECT_EQ(l.at("runs")[1].at("dir"), branch);
  EXPECT_EQ(l.at("runs")[1].at("lineage").at("parent").at("run_id"), l.at("runs")[0].at("lineage").at("run_id"));
  EXPECT_EQ(l.at("runs")[1].at("lineage").at("parent").at("step"), 10);
  fs::remove_all(root);
}

TEST(CliJson, ReportPrintsTheAbTable) {
  const std::string root = fresh_dir("cli-json-report");
  std::string dirs;
  for (const std::string arm : {"base", "hot"}) {
    for (int seed : {1, 2, 3}) {
      const std::string dir = root + "/" + arm + "-seed" + std::to_string(seed);
      train(dir, "--set train.steps=6 --set checkpoint.at_end=false --set train.seed=" + std::to_string(seed) +
                     (arm == "hot" ? " --set optim.lr=1e-2" : ""));
      dirs += " " + dir;
    }
  }
  const json j = keel_json("report" + dirs + " --baseline base --json");
  EXPECT_EQ(j.at("baseline"), "base");
  EXPECT_EQ(j.at("arms"), json::array({"base", "hot"}));
  EXPECT_EQ(j.at("confidence"), 0.95);
  EXPECT_TRUE(j.at("report").is_null());
  ASSERT_EQ(j.at("runs").size(), 6u);
  EXPECT_EQ(j.at("runs")[3].at("arm"), "hot");
  EXPECT_EQ(j.at("runs")[3].at("seed"), 1);
  ASSERT_EQ(j.at("rows").size(), 2u) << j.dump(2);  // final train loss of both arms (no eval files)
  const json& base = j.at("rows")[0];
  const json& hot = j.at("rows")[1];
  EXPECT_EQ(base.at("metric").at("kind"), "final_train_loss");
  EXPECT_TRUE(base.at("difference").is_null());
  EXPECT_EQ(hot.at("arm"), "hot");
  EXPECT_EQ(hot.at("n"), 3);
  EXPECT_EQ(hot.at("seeds"), json::array({1, 2, 3}));
  const json& d = hot.at("difference");
  EXPECT_EQ(d.at("test"), "paired_t");
  EXPECT_EQ(d.at("paired"), true);
  EXPECT_EQ(d.at("n"), 3);
  EXPECT_EQ(d.at("df"), 2.0);
  EXPECT_NEAR(d.at("t").get<double>(), 4.302652729911275, 1e-9);
  // The difference is hot minus base per seed, and the interval is mean ± t * sd / sqrt(n) of those.
  ASSERT_EQ(d.at("pairs").size(), 3u);
  double sum = 0.0;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(d.at("pairs")[i].at("seed"), static_cast<int>(i) + 1);
    const double expected = hot.at("values")[i].get<double>() - base.at("values")[i].get<double>();
    EXPECT_DOUBLE_EQ(d.at("pairs")[i].at("value").get<double>(), expected);
    sum += expected;
  }
  const double mean = d.at("mean").get<double>(), sd = d.at("sd").get<double>();
  EXPECT_NEAR(mean, sum / 3.0, 1e-12);
  EXPECT_NEAR(d.at("ci_low").get<double>(), mean - d.at("t").get<double>() * sd / std::sqrt(3.0), 1e-12);
  EXPECT_NEAR(d.at("ci_high").get<double>(), mean + d.at("t").get<double>() * sd / std::sqrt(3.0), 1e-12);

  // With -o the page is written too and named in the JSON.
  const std::string page = root + "/report.html";
  const json with_page = keel_json("report" + dirs + " --json -o " + page);
  EXPECT_EQ(with_page.at("report"), page);
  EXPECT_TRUE(fs::exists(page));
  fs::remove_all(root);
}

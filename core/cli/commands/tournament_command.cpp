// Why: `keel tournament --from CKPT --arms FILE.ini --steps K [--seeds N] [--out DIR] [--jobs J] [--json]` answers
// "which remediation works here?" after a loss spike: every arm of the arms file is a branch of one checkpoint
// on paired data (core/forensics/tournament_run.h), measured the same way, and the arms are compared with a paired
// bootstrap (core/forensics/tournament.h) that names the winner with its 95% interval, or says there is no clear
// winner. Writes OUT/tournament.json, OUT/tournament.txt and OUT/report.html (keel report of the branches).
// Exit 0 with a result (whatever it says), 1 when the tournament could not be run (docs/forensics.md).
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/forensics/tournament.h"
#include "core/forensics/tournament_run.h"
#include "core/metrics/logger.h"
#include "core/report/ab_stats.h"
#include "core/report/report_page.h"
#include "core/report/run_data.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

struct TournamentOptions {
  std::string from, arms, out, measure = "auto";
  int64_t steps = 0, seeds = 1, jobs = 1, windows = 32, resamples = 2000;
  bool json = false;
};

constexpr uint64_t kBootstrapSeed = 20261203;  // fixed: the same inputs give the same interval

// Every arm's overrides are loaded onto the checkpoint's config before anything runs: an error names the line
// of the entry that causes it (or the arm's header when only the combination fails).
void check_arm_configs(const std::vector<forensics::Arm>& arms, const std::string& ckpt_config,
                       const std::string& arms_path) {
  auto check = [&](const std::vector<std::string>& sets, const std::vector<std::string>& plugins,
                   const std::vector<std::string>& plugin_args, int line, const std::string& arm) {
    try {
      std::vector<std::string> overrides = sets;
      append_plugin_overrides(plugins, plugin_args, overrides);
      (void)load_config(ckpt_config, overrides);
    } catch (const std::exception& e) {
      throw forensics::TournamentError(arms_path + ":" + std::to_string(line) + ": [arm." + arm + "]: " + e.what());
    }
  };
  for (const auto& arm : arms) {
    for (const auto& e : arm.entries) check(e.overrides, e.plugins, e.plugin_args, e.line, arm.name);
    check(arm.overrides(), arm.plugins(), arm.plugin_args(), arm.line, arm.name);
  }
}

std::string default_out() {
  char buf[64];
  const std::time_t now = std::time(nullptr);
  std::strftime(buf, sizeof(buf), "tournament-%Y%m%d-%H%M%S", std::gmtime(&now));
  return buf;
}

nlohmann::json diff_json(const forensics::PairedDiff& d) { return {{"mean_diff", d.mean}, {"ci95", {d.lo, d.hi}}}; }

nlohmann::json result_json(const TournamentOptions& o, const forensics::TournamentSetup& setup,
                           const std::vector<forensics::Branch>& branches, const forensics::Measurement& m,
                           const forensics::TournamentVerdict& v, size_t baseline) {
  const size_t units = m.units.empty() ? 0 : m.units[0].size() * static_cast<size_t>(setup.seeds);
  nlohmann::json j{{"format", "keel-tournament"},
                   {"version", 1},
                   {"checkpoint", setup.checkpoint},
                   {"from_step", setup.from_step},
                   {"steps", setup.steps},
                   {"seeds", setup.seeds},
                   {"arms_file", o.arms},
                   {"out", setup.out},
                   {"measure_kind", m.kind},
                   {"measure", m.description},
                   {"units", units},
                   {"test", "paired bootstrap over the " + std::to_string(units) + " units (" +
                                (m.kind == "heldout" ? "window" : "sample") + " x replicate) of each pair of arms, " +
                                std::to_string(o.resamples) +
                                " resamples, 95% percentile interval of the mean "
                                "difference"},
                   {"baseline", setup.arms[baseline].name},
                   {"arms", nlohmann::json::array()}};
  for (size_t a = 0; a < setup.arms.size(); ++a) {
    const auto& arm = setup.arms[a];
    nlohmann::json changes = nlohmann::json::array(), dirs = nlohmann::json::array();
    for (const auto& e : arm.entries) changes.push_back(e.text);
    for (const auto& b : branches)
      if (b.arm == a) dirs.push_back(b.run_dir);
    j["arms"].push_back({{"name", arm.name},
                         {"baseline", a == baseline},
                         {"changes", changes},
                         {"run_dirs", dirs},
                         {"mean_nll", v.mean[a]},
                         {"vs_baseline", diff_json(v.vs_baseline[a])}});
  }
  const std::string best = setup.arms[v.best].name, runner = setup.arms[v.runner_up].name;
  j["winner"] = v.clear ? nlohmann::json(best) : nlohmann::json(nullptr);
  j["winner_vs_runner_up"] = diff_json(v.best_vs_runner_up);
  j["winner_vs_runner_up"]["best"] = best;
  j["winner_vs_runner_up"]["runner_up"] = runner;
  char line[512];
  if (v.clear) {
    std::snprintf(line, sizeof(line),
                  "winner: %s (mean NLL %.4f; vs runner-up %s %+.4f, 95%% CI [%+.4f, %+.4f], below 0)", best.c_str(),
                  v.mean[v.best], runner.c_str(), v.best_vs_runner_up.mean, v.best_vs_runner_up.lo,
                  v.best_vs_runner_up.hi);
  } else {
    std::snprintf(line, sizeof(line),
                  "no clear winner: the best, %s (mean NLL %.4f), vs runner-up %s: %+.4f, 95%% CI [%+.4f, %+.4f] "
                  "includes 0",
                  best.c_str(), v.mean[v.best], runner.c_str(), v.best_vs_runner_up.mean, v.best_vs_runner_up.lo,
                  v.best_vs_runner_up.hi);
  }
  j["verdict"] = line;
  return j;
}

// keel report of every branch into OUT/report.html (arms grouped by the -seedI suffix, A/B against the baseline).
std::string write_report(const forensics::TournamentSetup& setup, const std::vector<forensics::Branch>& branches,
                         const std::string& baseline) {
  std::vector<report::RunData> runs;
  for (const auto& b : branches) runs.push_back(report::gather_run(b.run_dir));
  const report::AbTable table = report::build_ab_table(runs, baseline);
  const std::string title = "keel tournament from " + setup.checkpoint;
  const std::string path = setup.out + "/report.html";
  report::write_page(path, report::render_page(report::report_json(runs, table, title), title));
  return path;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.close();
  if (!f) throw std::runtime_error("cannot write " + path);
}

forensics::TournamentSetup make_setup(const TournamentOptions& o, std::vector<forensics::Arm> arms) {
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(o.from);
  for (const auto& w : ckpt.warnings) std::cerr << "keel tournament: warning: " << w << "\n";
  const Config config = load_config(ckpt.dir + "/config.ini");
  check_arm_configs(arms, ckpt.dir + "/config.ini", o.arms);
  forensics::TournamentSetup s;
  s.keel = fs::read_symlink("/proc/self/exe").string();
  s.checkpoint = fs::absolute(ckpt.dir).lexically_normal().string();
  s.from_step = ckpt.manifest.step;
  s.steps = o.steps;
  s.seeds = o.seeds;
  s.jobs = o.jobs;
  s.world = config.parallel.dp * config.parallel.tp * config.parallel.pp;
  s.decay_steps = config.lr_decay_steps();
  s.out = fs::absolute(o.out).lexically_normal().string();
  s.arms = std::move(arms);
  s.parent_skip = config.data.skip;
  // Where every source's cursor stands: the data ledger of the checkpoint (placeholders: no tensor is read).
  const auto cursors = forensics::ledger_cursors(checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1).data_ledger);
  for (int64_t i = 0; i < o.seeds; ++i)
    s.replicate_skip.push_back(forensics::replicate_skip_rules(cursors, config.data.chunks, i, o.seeds));
  return s;
}

}  // namespace

int cmd_tournament(const Args& args) {
  TournamentOptions o;
  po::options_description options("keel tournament");
  options.add_options()("from", po::value<std::string>(&o.from)->required(),
                        "checkpoint dir (or run dir: its newest valid checkpoint) every arm resumes from")(
      "arms", po::value<std::string>(&o.arms)->required(), "arms file: one [arm.NAME] section per arm")(
      "steps", po::value<int64_t>(&o.steps)->required(), "steps every arm trains (K >= 1)")(
      "seeds", po::value<int64_t>(&o.seeds),
      "replicates per arm (default 1; replicate i starts i/N of an epoch "
      "further along every source, the same in every arm)")("out", po::value<std::string>(&o.out),
                                                            "output dir, new (default tournament-YYYYmmdd-HHMMSS)")(
      "jobs", po::value<int64_t>(&o.jobs), "branches run at once (default 1)")(
      "windows", po::value<int64_t>(&o.windows), "held-out windows per source (default 32)")(
      "resamples", po::value<int64_t>(&o.resamples), "bootstrap resamples (default 2000)")(
      "measure", po::value<std::string>(&o.measure),
      "auto (held-out NLL; the training loss of the last steps when no source has a held-out set) or train-loss")(
      "json", "print tournament.json instead of the table")("help", "show this help");
  const po::variables_map vm = parse_args(args, options, "tournament");
  if (vm.count("help")) {
    std::cout << "usage: keel tournament --from CKPT --arms FILE.ini --steps K [--seeds N] [--out DIR] [--jobs J] "
                 "[--json]\nResumes CKPT once per arm (and replicate) for K steps on paired data, measures every "
                 "branch on the held-out split and names the winner with a paired bootstrap interval "
                 "(docs/forensics.md).\n\n"
              << options;
    return 0;
  }
  o.json = vm.count("json") > 0;
  if (o.json) metrics::setup_logging();  // log lines to stderr: stdout holds the JSON object only
  if (o.steps < 1) throw std::runtime_error("--steps must be >= 1, got " + std::to_string(o.steps));
  if (o.seeds < 1) throw std::runtime_error("--seeds must be >= 1, got " + std::to_string(o.seeds));
  if (o.jobs < 1) throw std::runtime_error("--jobs must be >= 1, got " + std::to_string(o.jobs));
  if (o.windows < 1) throw std::runtime_error("--windows must be >= 1, got " + std::to_string(o.windows));
  if (o.resamples < 100) throw std::runtime_error("--resamples must be >= 100, got " + std::to_string(o.resamples));
  if (o.measure != "auto" && o.measure != "train-loss")
    throw std::runtime_error("--measure must be auto or train-loss, got '" + o.measure + "'");
  if (o.out.empty()) o.out = default_out();
  if (fs::exists(o.out)) throw std::runtime_error("--out " + o.out + " exists; a tournament never overwrites one");

  const forensics::TournamentSetup setup = make_setup(o, forensics::read_arms(o.arms));
  const size_t baseline = forensics::baseline_index(setup.arms);
  const std::vector<forensics::Branch> branches = forensics::plan_branches(setup);
  if (!o.json)
    std::cout << "keel tournament: " << setup.arms.size() << " arms x " << o.seeds << " replicate(s) from "
              << setup.checkpoint << " (step " << setup.from_step << "), " << o.steps << " steps, " << o.jobs
              << " at a time; logs in " << setup.out << "/logs/" << std::endl;
  forensics::run_branches(setup, branches);
  const forensics::Measurement m = forensics::measure_branches(setup, branches, o.windows, o.measure == "train-loss");

  // Units of one arm: its replicates' units one after the other (unit u of every arm is the same window or slot).
  std::vector<forensics::ArmScores> scores(setup.arms.size());
  for (size_t i = 0; i < branches.size(); ++i) {
    auto& s = scores[branches[i].arm];
    s.name = setup.arms[branches[i].arm].name;
    s.units.insert(s.units.end(), m.units[i].begin(), m.units[i].end());
  }
  const forensics::TournamentVerdict v = forensics::decide(scores, baseline, o.resamples, kBootstrapSeed);
  nlohmann::json result = result_json(o, setup, branches, m, v, baseline);
  result["report"] = write_report(setup, branches, setup.arms[baseline].name);
  write_file(setup.out + "/tournament.json", result.dump(2) + "\n");
  const std::string table = forensics::format_table(result);
  write_file(setup.out + "/tournament.txt", table);
  if (o.json) {
    print_json(result);
  } else {
    std::cout << table << "wrote " << setup.out << "/tournament.json, tournament.txt, report.html\n";
  }
  return 0;
}

}  // namespace keel::cli

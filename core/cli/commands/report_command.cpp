// Why: `keel report RUN_DIR... -o report.html [--baseline ARM] [--title TEXT] [--json]` (docs/report.md) puts
// several runs on one self-contained HTML page: their curves with events, per-tensor grad-norm heatmaps,
// the lineage tree and the A/B table. With --json the A/B table is also printed as one JSON object (the page is
// then optional), so scripts take their statistics from the one implementation in core/report/ab_stats.cpp.
// A `keel tournament` output dir given as RUN_DIR stands for its branches, with its baseline arm as --baseline.
// This file only parses the command line; core/report/ does the work.
#include <filesystem>
#include <fstream>
#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/logger.h"
#include "core/report/ab_stats.h"
#include "core/report/report_page.h"
#include "core/report/run_data.h"

namespace keel::cli {

int cmd_report(const Args& args) {
  std::vector<std::string> run_dirs;
  std::string out, baseline, title;
  po::options_description options("keel report RUN_DIR... -o FILE.html [--json]");
  // clang-format off
  options.add_options()
      ("out,o", po::value<std::string>(&out), "HTML file to write (replaced atomically if it exists)")
      ("baseline", po::value<std::string>(&baseline), "arm the A/B table compares against (default: the first arm)")
      ("title", po::value<std::string>(&title), "page title (default: keel report: RUN, RUN, ...)")
      ("json", "print the A/B table as one JSON object on stdout (docs/cli.md); -o is then optional")
      ("help", "show this help");
  // clang-format on
  const po::variables_map vm = parse_args(args, options, "report", &run_dirs);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (run_dirs.empty()) throw std::runtime_error("expected at least one RUN_DIR (see keel report --help)");
  const bool json = vm.count("json") > 0;
  if (json) metrics::setup_logging();  // any log line to stderr: stdout holds the JSON object only
  if (out.empty() && !json) throw std::runtime_error("missing -o FILE.html (where to write the report), or --json");

  std::vector<report::RunData> runs;
  for (const auto& dir : run_dirs) {
    // A `keel tournament` output dir stands for its branches (tournament.json lists them, arm by arm).
    const std::string tournament = (std::filesystem::path(dir) / "tournament.json").string();
    if (!std::filesystem::exists(dir + "/metrics.h5") && std::filesystem::exists(tournament)) {
      std::ifstream in(tournament);
      const nlohmann::json t = nlohmann::json::parse(in, nullptr, false);
      if (t.is_discarded() || !t.contains("arms")) throw std::runtime_error(tournament + ": not a tournament.json");
      for (const auto& arm : t.at("arms"))
        for (const auto& branch : arm.at("run_dirs")) runs.push_back(report::gather_run(branch.get<std::string>()));
      if (baseline.empty() && t.contains("baseline")) baseline = t.at("baseline").get<std::string>();
      continue;
    }
    runs.push_back(report::gather_run(dir));
  }
  const report::AbTable table = report::build_ab_table(runs, baseline);
  if (title.empty()) {
    title = "keel report:";
    for (size_t i = 0; i < runs.size(); ++i) title += (i ? ", " : " ") + runs[i].name;
  }
  if (json) {
    nlohmann::json j = report::ab_table_json(table);
    j["runs"] = nlohmann::json::array();
    for (const auto& run : runs)
      j["runs"].push_back({{"name", run.name}, {"dir", run.dir}, {"arm", run.arm.arm}, {"seed", run.arm.seed}});
    j["report"] = out.empty() ? nlohmann::json(nullptr) : nlohmann::json(out);
    if (!out.empty()) report::write_page(out, report::render_page(report::report_json(runs, table, title), title));
    print_json(j);
    return 0;
  }
  report::write_page(out, report::render_page(report::report_json(runs, table, title), title));
  std::cout << "wrote " << out << " (" << runs.size() << " run(s), " << table.arms.size() << " arm(s), baseline "
            << table.baseline << ")\n";
  for (const auto& note : table.notes) std::cout << "note: " << note << "\n";
  return 0;
}

}  // namespace keel::cli

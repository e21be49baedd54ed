// Why: `keel report RUN_DIR... -o report.html [--baseline ARM] [--title TEXT]` (issue 7, part 4; docs/report.md)
// puts several runs on one self-contained HTML page: their curves with events, per-tensor grad-norm heatmaps,
// the lineage tree and the A/B table. This file only parses the command line; core/report/ does the work.
#include <filesystem>
#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/report/ab_stats.h"
#include "core/report/report_page.h"
#include "core/report/run_data.h"

namespace keel::cli {

int cmd_report(const Args& args) {
  std::vector<std::string> run_dirs;
  std::string out, baseline, title;
  po::options_description options("keel report RUN_DIR... -o FILE.html");
  // clang-format off
  options.add_options()
      ("out,o", po::value<std::string>(&out), "HTML file to write (replaced atomically if it exists)")
      ("baseline", po::value<std::string>(&baseline), "arm the A/B table compares against (default: the first arm)")
      ("title", po::value<std::string>(&title), "page title (default: keel report: RUN, RUN, ...)")
      ("help", "show this help");
  // clang-format on
  const po::variables_map vm = parse_args(args, options, "report", &run_dirs);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (run_dirs.empty()) throw std::runtime_error("expected at least one RUN_DIR (see keel report --help)");
  if (out.empty()) throw std::runtime_error("missing -o FILE.html (where to write the report)");

  std::vector<report::RunData> runs;
  for (const auto& dir : run_dirs) runs.push_back(report::gather_run(dir));
  const report::AbTable table = report::build_ab_table(runs, baseline);
  if (title.empty()) {
    title = "keel report:";
    for (size_t i = 0; i < runs.size(); ++i) title += (i ? ", " : " ") + runs[i].name;
  }
  report::write_page(out, report::render_page(report::report_json(runs, table, title), title));
  std::cout << "wrote " << out << " (" << runs.size() << " run(s), " << table.arms.size() << " arm(s), baseline "
            << table.baseline << ")\n";
  for (const auto& note : table.notes) std::cout << "note: " << note << "\n";
  return 0;
}

}  // namespace keel::cli

// Why: `keel plugins [--json]` shows what can be loaded by name (and why a file found there cannot); --json gives
// the same as one JSON object (docs/cli.md) so that scripts need not read the human listing.
#include <filesystem>
#include <iostream>
#include <sstream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/logger.h"
#include "core/plugin_host/plugin_library.h"

namespace keel::cli {
namespace {

// "optimizer,spike_handler" -> ["optimizer", "spike_handler"]
nlohmann::json slot_list(uint32_t slots) {
  nlohmann::json out = nlohmann::json::array();
  std::stringstream names(plugin_host::slot_names(slots));
  std::string name;
  while (std::getline(names, name, ',')) {
    if (!name.empty()) out.push_back(name);
  }
  return out;
}

}  // namespace

int cmd_plugins(const Args& args) {
  po::options_description options("keel plugins [--json]");
  // clang-format off
  options.add_options()
      ("json", "print the search path and the plugins as one JSON object (docs/cli.md)")
      ("help", "show this help");
  // clang-format on
  const auto vm = parse_args(args, options, "plugins");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (vm.count("json")) metrics::setup_logging();  // any log line to stderr: stdout holds the JSON object only
  const auto dirs = plugin_host::plugin_search_dirs();
  const auto found = plugin_host::discover_plugins();
  if (vm.count("json")) {
    nlohmann::json j{
        {"search_path", dirs}, {"plugins", nlohmann::json::array()}, {"unusable", nlohmann::json::array()}};
    for (const auto& f : found) {
      if (!f.error.empty()) {
        j["unusable"].push_back({{"path", f.path}, {"error", f.error}});
        continue;
      }
      const auto& d = f.description;
      j["plugins"].push_back({{"name", d.name},
                              {"version", d.version},
                              {"slots", slot_list(d.slots)},
                              {"description", d.description},
                              {"path", d.path}});
    }
    print_json(j);
    return 0;
  }
  std::cout << "plugin search path (KEEL_PLUGIN_PATH first):\n";
  for (const auto& dir : dirs) std::cout << "  " << dir << "\n";
  std::cout << "\n" << found.size() << " plugins:\n";
  for (const auto& f : found) {
    if (!f.error.empty()) {
      std::cout << "  (unusable) " << f.path << "\n      " << f.error << "\n";
      continue;
    }
    const auto& d = f.description;
    std::cout << "  " << d.name << " " << d.version << "  [" << plugin_host::slot_names(d.slots) << "]  "
              << d.description << "\n      " << d.path << "\n";
  }
  return 0;
}

}  // namespace keel::cli

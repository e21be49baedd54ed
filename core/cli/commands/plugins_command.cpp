// Why: `keel plugins` shows what can be loaded by name (and why a file found there cannot).
#include <filesystem>
#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/plugin_host/plugin_library.h"

namespace keel::cli {

int cmd_plugins(const Args& args) {
  if (!args.empty()) throw std::runtime_error("usage: keel plugins");
  std::cout << "plugin search path (KEEL_PLUGIN_PATH first):\n";
  for (const auto& dir : plugin_host::plugin_search_dirs()) std::cout << "  " << dir << "\n";
  const auto found = plugin_host::discover_plugins();
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

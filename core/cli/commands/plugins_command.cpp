// Why: `keel plugins` shows what can be loaded by name (and why a file found there cannot), and
// `keel control RUN_DIR swap SLOT=NAME_OR_PATH [--plugin-arg NAME.key=value]... [--at-step N]` asks a running
// job to swap a plugin at its next step boundary (or at the boundary before step N): the request is a file in RUN_DIR/control/ that the trainer picks up,
// applies after saving a checkpoint, and renames to .done (or .refused, with the reason, keeping its plugins).
#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "core/checkpoint/durable_fs.h"
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

int cmd_control(const Args& args) {
  namespace fs = std::filesystem;
  if (args.size() < 3 || args[1] != "swap")
    throw std::runtime_error(
        "usage: keel control RUN_DIR swap SLOT=NAME_OR_PATH [--plugin-arg NAME.key=value]... [--at-step N]");
  const std::string run_dir = args[0];
  if (!fs::exists(run_dir + "/metrics.h5")) throw std::runtime_error(run_dir + " is not a Keel run dir (no metrics.h5)");
  const std::string swap = args[2];
  const auto eq = swap.find('=');
  if (eq == std::string::npos || eq == 0) throw std::runtime_error("keel control: expected SLOT=NAME_OR_PATH, got " + swap);
  plugin_host::parse_slot(swap.substr(0, eq));
  std::ostringstream request;
  request << "swap " << swap << "\n";
  for (size_t i = 3; i < args.size(); ++i) {
    if (args[i] == "--plugin-arg" && i + 1 < args.size()) {
      request << "arg " << args[++i] << "\n";
    } else if (args[i] == "--at-step" && i + 1 < args.size()) {
      const std::string n = args[++i];
      if (n.empty() || n.find_first_not_of("0123456789") != std::string::npos)
        throw std::runtime_error("keel control: --at-step needs a step number, got " + n);
      request << "at_step " << n << "\n";
    } else {
      throw std::runtime_error("keel control: unexpected argument " + args[i]);
    }
  }
  const std::string dir = run_dir + "/control";
  fs::create_directories(dir);
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const std::string path =
      dir + "/" + std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(now).count()) + ".request";
  checkpoint::write_file_atomically(path, request.str());
  std::cout << "swap request written: " << path << "\n"
            << "the run applies it at its next step boundary (after saving a checkpoint); the file then becomes\n"
            << ".done, or .refused with the reason, and metrics.h5 gets a plugin_swap or plugin_swap_refused event\n";
  return 0;
}

}  // namespace keel::cli

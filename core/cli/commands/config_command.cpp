// Why: `keel config keys` documents every key; `keel config show` prints a resolved config, so a user can see
// exactly what a run would use before starting it.
#include <iomanip>
#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"

namespace keel::cli {

int cmd_config(const Args& args) {
  if (args.empty() || (args[0] != "keys" && args[0] != "show"))
    throw std::runtime_error("usage: keel config keys | keel config show --config FILE [--set key=value]...");
  if (args[0] == "keys") {
    for (const auto& [key, doc] : documented_keys()) std::cout << std::left << std::setw(28) << key << doc << "\n";
    return 0;
  }
  std::string config_path;
  std::vector<std::string> overrides;
  po::options_description options("keel config show");
  add_config_options(options, config_path, overrides);
  parse_args(Args(args.begin() + 1, args.end()), options, "config show");
  std::cout << to_ini(load_config(config_path, overrides));
  return 0;
}

}  // namespace keel::cli

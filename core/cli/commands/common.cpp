// Why: see common.h.
#include "core/cli/commands/common.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "core/plugin_host/plugin_library.h"
#include "core/plugin_host/slots.h"

namespace keel::cli {

void add_config_options(po::options_description& options, std::string& config_path,
                        std::vector<std::string>& overrides) {
  options.add_options()("config", po::value<std::string>(&config_path)->required(), "INI config file")(
      "set", po::value<std::vector<std::string>>(&overrides)->composing(),
      "override a key: --set section.key=value (repeatable)");
}

void add_plugin_options(po::options_description& options, std::vector<std::string>& plugins,
                        std::vector<std::string>& plugin_args) {
  options.add_options()("plugin", po::value<std::vector<std::string>>(&plugins)->composing(),
                        "fill a plugin slot: --plugin SLOT=NAME_OR_PATH (repeatable; see `keel plugins`)")(
      "plugin-arg", po::value<std::vector<std::string>>(&plugin_args)->composing(),
      "argument of a plugin: --plugin-arg NAME.key=value (repeatable)");
}

void append_plugin_overrides(const std::vector<std::string>& plugins, const std::vector<std::string>& plugin_args,
                             std::vector<std::string>& overrides) {
  std::vector<std::pair<std::string, std::string>> slots;  // slot -> accumulated value, in first-seen order
  for (const auto& p : plugins) {
    const auto eq = p.find('=');
    if (eq == std::string::npos || eq == 0)
      throw std::runtime_error("--plugin " + p + ": expected SLOT=NAME_OR_PATH (e.g. spike_handler=zscore_skip)");
    const std::string slot = p.substr(0, eq), value = p.substr(eq + 1);
    const bool chain = plugin_host::slot_info(slot).chain;  // throws naming the known slots
    auto it = std::find_if(slots.begin(), slots.end(), [&](const auto& s) { return s.first == slot; });
    if (it == slots.end()) {
      slots.emplace_back(slot, value);
    } else if (chain) {
      it->second += value.empty() ? "" : (it->second.empty() ? "" : ",") + value;
    } else {
      throw std::runtime_error("--plugin " + slot + "= given twice; slot " + slot + " takes one plugin");
    }
  }
  for (const auto& [slot, value] : slots) overrides.push_back("plugins." + slot + "=" + value);
  for (const auto& a : plugin_args) {
    if (a.find('.') == std::string::npos || a.find('=') == std::string::npos)
      throw std::runtime_error("--plugin-arg " + a + ": expected NAME.key=value (e.g. zscore_skip.threshold=4)");
    overrides.push_back("plugin." + a);
  }
}

po::variables_map parse_args(const std::vector<std::string>& args, const po::options_description& options,
                             const std::string& command, std::vector<std::string>* positional) {
  po::variables_map vm;
  std::vector<std::string> stray;  // positional arguments of a command that takes none
  try {
    po::options_description all;
    all.add(options).add_options()("positional-argument",
                                   po::value<std::vector<std::string>>(positional ? positional : &stray));
    po::positional_options_description pos;
    pos.add("positional-argument", -1);
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
    if (vm.count("help")) return vm;
    po::notify(vm);
  } catch (const po::error& e) {
    throw std::runtime_error(std::string(e.what()) + " (see keel " + command + " --help)");
  }
  if (!stray.empty()) {
    throw std::runtime_error("unexpected argument '" + stray.front() + "' (see keel " + command + " --help)");
  }
  return vm;
}

void print_json(const nlohmann::json& value) {
  std::cout << value.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

void exit_on_distributed_error(const std::string& command, const std::string& message, int status) {
  std::cerr << "keel " << command << ": error: " << message << "\n";
  std::cout.flush();
  std::cerr.flush();
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& logger) { logger->flush(); });
  std::fflush(nullptr);
  std::_Exit(status);
}

}  // namespace keel::cli

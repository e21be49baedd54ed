// Why: `keel config keys` documents every key; `keel config show` prints a resolved config, so a user can see
// exactly what a run would use before starting it. With --json either prints one JSON object (docs/cli.md):
// scripts read a key with `keel config show --config FILE --json` instead of cutting the INI text apart.
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/logger.h"

namespace keel::cli {
namespace {

const char* const kUsage =
    "usage: keel config keys [--json] | keel config show --config FILE [--set key=value]... [--plugin SLOT=NAME]... "
    "[--plugin-arg NAME.key=value]... [--json]";

bool is_number(const std::string& text) {
  if (text.empty()) return false;
  char* end = nullptr;
  std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size();
}

// A key's value as JSON, typed by the key's default: a key whose default is true/false is a boolean, one whose
// default is a number is a number (an integer when the value is written as one), every other key a string. The
// type thus depends on the key alone, never on the value a user wrote.
nlohmann::json typed_value(const std::string& default_value, const std::string& value) {
  if (default_value == "true" || default_value == "false") return value == "true";
  if (!is_number(default_value) || !is_number(value)) return value;
  const bool integer = value.find_first_not_of("0123456789", value[0] == '-' ? 1 : 0) == std::string::npos;
  if (integer && value[0] == '-') return std::strtoll(value.c_str(), nullptr, 10);
  if (integer) return std::strtoull(value.c_str(), nullptr, 10);
  return std::strtod(value.c_str(), nullptr);
}

// {"model": {"layers": 4, ...}, ..., "source": {"NAME": {"inputs": [...], ...}}, "plugin": {"NAME": {"KEY": "v"}}}
nlohmann::json config_json(const Config& config) {
  std::map<std::string, std::string> defaults;
  for (const auto& [key, value] : flatten(Config{})) defaults[key] = value;
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [key, value] : flatten(config)) {
    const auto first_dot = key.find('.');
    const std::string section = key.substr(0, first_dot), rest = key.substr(first_dot + 1);
    if (section == "source") {  // source.NAME.FIELD
      const auto dot = rest.rfind('.');
      const std::string name = rest.substr(0, dot), field = rest.substr(dot + 1);
      nlohmann::json typed = value;
      if (field == "inputs") {
        typed = nlohmann::json::array();
        std::stringstream items(value);
        std::string item;
        while (std::getline(items, item, ',')) {
          if (!item.empty()) typed.push_back(item);
        }
      } else if (field == "max_mb" && is_number(value)) {
        typed = std::strtod(value.c_str(), nullptr);
      }
      out["source"][name][field] = typed;
    } else if (section == "plugin") {  // plugin.NAME.KEY: the plugin parses its own arguments, so strings
      const auto dot = rest.find('.');
      out["plugin"][rest.substr(0, dot)][rest.substr(dot + 1)] = value;
    } else {
      const auto d = defaults.find(key);
      out[section][rest] = d == defaults.end() ? nlohmann::json(value) : typed_value(d->second, value);
    }
  }
  return out;
}

}  // namespace

int cmd_config(const Args& args) {
  if (args.empty()) throw std::runtime_error(kUsage);
  const std::string sub = args[0];
  if (sub == "--help" || sub == "-h") {
    std::cout << kUsage << "\n  keys  every config key with its documentation\n"
              << "  show  the resolved config of FILE with the overrides applied (defaults filled in)\n"
              << "keel config keys --help, keel config show --help: their options\n";
    return 0;
  }
  if (sub != "keys" && sub != "show") throw std::runtime_error("unknown subcommand '" + sub + "'; " + kUsage);
  std::string config_path;
  std::vector<std::string> overrides, plugins, plugin_args;
  po::options_description options("keel config " + sub);
  if (sub == "show") {
    add_config_options(options, config_path, overrides);
    add_plugin_options(options, plugins, plugin_args);
  }
  // clang-format off
  options.add_options()
      ("json", "print one JSON object instead of text (docs/cli.md)")
      ("help", "show this help");
  // clang-format on
  const auto vm = parse_args(Args(args.begin() + 1, args.end()), options, "config " + sub);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  const bool json = vm.count("json") > 0;
  if (json) metrics::setup_logging();  // any log line to stderr: stdout holds the JSON object only
  if (sub == "keys") {
    if (json) {
      nlohmann::json keys = nlohmann::json::array();
      for (const auto& [key, doc] : documented_keys()) keys.push_back({{"key", key}, {"doc", doc}});
      print_json({{"keys", keys}});
      return 0;
    }
    for (const auto& [key, doc] : documented_keys()) std::cout << std::left << std::setw(28) << key << doc << "\n";
    return 0;
  }
  append_plugin_overrides(plugins, plugin_args, overrides);
  const Config config = load_config(config_path, overrides);
  if (json) {
    print_json({{"file", config_path}, {"config", config_json(config)}});
    return 0;
  }
  std::cout << to_ini(config);
  return 0;
}

}  // namespace keel::cli

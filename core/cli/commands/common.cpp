// Why: see common.h.
#include "core/cli/commands/common.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace keel::cli {

void add_config_options(po::options_description& options, std::string& config_path, std::vector<std::string>& overrides) {
  options.add_options()
      ("config", po::value<std::string>(&config_path)->required(), "INI config file")
      ("set", po::value<std::vector<std::string>>(&overrides)->composing(), "override a key: --set section.key=value (repeatable)");
}

po::variables_map parse_args(const std::vector<std::string>& args, const po::options_description& options,
                             const std::string& command) {
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(options).run(), vm);
    if (vm.count("help")) return vm;
    po::notify(vm);
  } catch (const po::error& e) {
    throw std::runtime_error("keel " + command + ": " + e.what());
  }
  return vm;
}

void setup_logging(const std::string& log_file) {
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!log_file.empty()) sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(log_file, /*truncate=*/false));
  auto logger = std::make_shared<spdlog::logger>("keel", sinks.begin(), sinks.end());
  logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace keel::cli

// Why: options shared by the subcommands that read a config (--config FILE, --set key=value...).
#pragma once

#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "core/config/config.h"

namespace keel::cli {

namespace po = boost::program_options;

void add_config_options(po::options_description& options, std::string& config_path, std::vector<std::string>& overrides);
// Parses args against `options` (no positional arguments); unknown options are errors naming them.
po::variables_map parse_args(const std::vector<std::string>& args, const po::options_description& options,
                             const std::string& command);
// Log to the console (and to `log_file` when given) with spdlog.
void setup_logging(const std::string& log_file = "");

}  // namespace keel::cli

// Why: options shared by the subcommands that read a config (--config FILE, --set key=value...).
#pragma once

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/config/config.h"

namespace keel::cli {

namespace po = boost::program_options;

void add_config_options(po::options_description& options, std::string& config_path,
                        std::vector<std::string>& overrides);
// --plugin SLOT=NAME_OR_PATH and --plugin-arg NAME.key=value (both repeatable).
void add_plugin_options(po::options_description& options, std::vector<std::string>& plugins,
                        std::vector<std::string>& plugin_args);
// Turns them into config overrides (plugins.SLOT=..., plugin.NAME.key=...), appended to `overrides`; several
// --plugin for a chain slot (grad_transform, observers) build a comma-separated chain in order. Throws for an
// unknown slot or a malformed value.
void append_plugin_overrides(const std::vector<std::string>& plugins, const std::vector<std::string>& plugin_args,
                             std::vector<std::string>& overrides);
// Parses args against `options`; unknown options are errors naming them. Positional arguments are errors too,
// unless `positional` is given: then they are collected there, in order. Errors are thrown as one line,
// "MESSAGE (see keel COMMAND --help)", which main prints after "keel COMMAND: error: ". With --help among the
// args, required options and their checks are skipped: the caller prints its help and exits 0.
po::variables_map parse_args(const std::vector<std::string>& args, const po::options_description& options,
                             const std::string& command, std::vector<std::string>* positional = nullptr);
// The --json output of a command: `value` on stdout, indented, then a newline (invalid UTF-8 replaced).
void print_json(const nlohmann::json& value);
// Prints "keel COMMAND: error: MESSAGE", flushes everything this process has to say, then exits with `status`
// without running any destructor: after a DistributedError the c10d/Gloo/NCCL objects still alive may wait on
// the missing rank, and the launcher (keel launch, torchrun, srun) is waiting for this exit.
[[noreturn]] void exit_on_distributed_error(const std::string& command, const std::string& message, int status = 1);

}  // namespace keel::cli

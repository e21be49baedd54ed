// Why: `keel data prepare` (tokenizer + shards for a config, idempotent) and `keel data show-batch --step N`
// (reconstruct any batch of any run from its config alone).
#include <spdlog/spdlog.h>

#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/data/loader.h"
#include "core/data/prepare.h"

namespace keel::cli {

int cmd_data(const Args& args) {
  const std::string usage = "usage: keel data prepare|show-batch --config FILE [--step N] [--set key=value]...";
  if (args.empty()) throw std::runtime_error(usage);
  const std::string sub = args[0];
  if (sub == "--help" || sub == "-h") {
    std::cout << usage << "\n  prepare     train (or reuse) the tokenizer and write the token shards of data.dir\n"
              << "  show-batch  the global batch of step N: source, sample id, epoch, chunk, first tokens\n"
              << "keel data prepare --help, keel data show-batch --help: their options\n";
    return 0;
  }
  if (sub != "prepare" && sub != "show-batch") throw std::runtime_error("unknown subcommand '" + sub + "'; " + usage);
  std::string config_path;
  std::vector<std::string> overrides;
  int64_t step = 0;
  int64_t show_tokens = 16;
  po::options_description options("keel data " + sub);
  add_config_options(options, config_path, overrides);
  if (sub == "prepare")
    options.add_options()("force", "rebuild the tokenizer and every shard even if the prepared data looks up to date");
  // clang-format off
  if (sub == "show-batch")
    options.add_options()
        ("step", po::value<int64_t>(&step)->required(), "step whose global batch to show")
        ("tokens", po::value<int64_t>(&show_tokens)->default_value(16), "tokens shown per sample");
  // clang-format on
  options.add_options()("help", "show this help");
  auto vm = parse_args(Args(args.begin() + 1, args.end()), options, "data " + sub);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  setup_logging();
  Config config = load_config(config_path, overrides);
  if (sub == "prepare") {
    data::PrepareOptions prepare_options;
    prepare_options.force = vm.count("force") > 0;
    data::prepare_data(config, prepare_options);
    std::cout << "prepared data: " << config.data.dir << "\n";
    return 0;
  }
  if (step < 0) throw std::runtime_error("show-batch: --step must be >= 0, got " + std::to_string(step));
  std::cout << data::show_batch(config, step, show_tokens);
  return 0;
}

}  // namespace keel::cli

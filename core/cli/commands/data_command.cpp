// Why: `keel data prepare` (tokenizer + shards for a config, idempotent) and `keel data show-batch --step N`
// (reconstruct any batch of any run from its config alone).
#include <iostream>

#include <spdlog/spdlog.h>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/data/loader.h"
#include "core/data/prepare.h"

namespace keel::cli {

int cmd_data(const Args& args) {
  if (args.empty() || (args[0] != "prepare" && args[0] != "show-batch"))
    throw std::runtime_error("usage: keel data prepare|show-batch --config FILE [--step N] [--set key=value]...");
  const std::string sub = args[0];
  std::string config_path;
  std::vector<std::string> overrides;
  int64_t step = 0;
  int64_t show_tokens = 16;
  po::options_description options("keel data " + sub);
  add_config_options(options, config_path, overrides);
  if (sub == "prepare")
    options.add_options()("force", "rebuild the tokenizer and every shard even if the prepared data looks up to date");
  if (sub == "show-batch")
    options.add_options()
        ("step", po::value<int64_t>(&step)->required(), "step whose global batch to show")
        ("tokens", po::value<int64_t>(&show_tokens)->default_value(16), "tokens shown per sample");
  auto vm = parse_args(Args(args.begin() + 1, args.end()), options, "data " + sub);
  setup_logging();
  Config config = load_config(config_path, overrides);
  if (sub == "prepare") {
    data::PrepareOptions prepare_options;
    prepare_options.force = vm.count("force") > 0;
    data::prepare_data(config, prepare_options);
    std::cout << "prepared data: " << config.data.dir << "\n";
    return 0;
  }
  if (step < 0) throw std::runtime_error("keel data show-batch: --step must be >= 0");
  std::cout << data::show_batch(config, step, show_tokens);
  return 0;
}

}  // namespace keel::cli

// Why: `keel train --config FILE --run-dir DIR [--set k=v]... [--force]`: resolve the config and open the data
// (both may fail; nothing is written yet), then hand over to train::run_on_ranks (core/train/run_ranks.h).
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/config/memory_estimate.h"
#include "core/train/run_ranks.h"
#include "keel/version.h"

namespace keel::cli {

int cmd_train(const Args& args) {
  std::string config_path, run_dir;
  std::vector<std::string> overrides, plugins, plugin_args;
  po::options_description options("keel train");
  add_config_options(options, config_path, overrides);
  add_plugin_options(options, plugins, plugin_args);
  options.add_options()("run-dir", po::value<std::string>(&run_dir)->required(),
                        "directory for metrics.h5, config.ini, checkpoints/")(
      "force", "replace an existing run in --run-dir")("help", "show this help");
  auto vm = parse_args(args, options, "train");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  append_plugin_overrides(plugins, plugin_args, overrides);
  Config config = load_config(config_path, overrides);  // all config errors before touching the run dir
  check_memory_fits(config);                            // an absurd model size, before anything is built or written
  if (config.train.device == Device::kCuda && !torch::cuda::is_available())
    throw std::runtime_error("train.device = cuda but no CUDA device is available to this build of keel");
  // Data next: an unprepared corpus is the most common first-run error; report it before claiming the run dir.
  auto loader = std::make_unique<data::DataLoader>(config, config.global_batch());
  train::RunRequest request;
  request.config = std::move(config);
  request.loader = std::move(loader);
  request.run_dir = run_dir;
  request.force = vm.count("force") > 0;
  request.description = "train: config " + config_path;
  request.on_distributed_error = [](const std::string& message) { exit_on_distributed_error("train", message); };
  return train::run_on_ranks(std::move(request));
}

std::string usage() {
  return "keel " KEEL_VERSION
         " - LLM training-stability workbench\n\n"
         "usage:\n"
         "  keel train --config FILE --run-dir DIR [--set key=value]... [--plugin SLOT=NAME]... [--plugin-arg "
         "NAME.k=v]...\n"
         "  keel resume --from RUN_DIR|CKPT_DIR --run-dir NEW_DIR [--set key=value]... [--plugin SLOT=NAME]...\n"
         "              [--plugin-arg NAME.k=v]... [--allow-data-change]\n"
         "  keel control RUN_DIR swap SLOT=NAME_OR_PATH [--plugin-arg NAME.k=v]... [--at-step N]\n"
         "  keel plugins [--json]\n"
         "  keel launch --nproc N [--master-addr A] [--master-port P] [--grace-s S] -- keel train ...\n"
         "  keel data prepare --config FILE [--set key=value]...\n"
         "  keel data show-batch --config FILE|--run RUN_DIR --step N [--to M] [--json] [--set key=value]...\n"
         "  keel data compare-order RUN_A RUN_B [--steps S..E] [--json]\n"
         "  keel inspect RUN_DIR|CKPT_DIR [RUN_DIR...] [--json]\n"
         "  keel export-hf CKPT_DIR OUT_DIR [--dtype fp32|bf16] [--no-tokenizer]\n"
         "  keel import-hf HF_DIR (--run-dir RUN_DIR | --dry-run) [--config FILE] [--set key=value]...\n"
         "                [--allow-tokenizer-change] [--json]\n"
         "  keel score CKPT_DIR|RUN_DIR (--tokens FILE.npy | --text FILE) [--json]\n"
         "  keel eval CKPT_DIR|RUN_DIR [--out FILE.h5] [--set key=value]... [--split heldout|train-tail|auto]\n"
         "            [--batches N] [--memorization-samples N] [--json]\n"
         "  keel eval --all RUN_DIR [--out FILE.h5] [--set key=value]... [--split ...] [--json]\n"
         "  keel report RUN_DIR... -o FILE.html [--baseline ARM] [--title TEXT] [--json]\n"
         "  keel plan --config FILE [--set key=value]... [--nproc N] [--path fused|reference] [--json]\n"
         "  keel verify RUN_DIR [--from CKPT] [--steps K] [--set key=value]... [--json]\n"
         "  keel forensics RUN_DIR --step N [--from CKPT] [--out DIR] [--json]\n"
         "  keel tournament --from CKPT --arms FILE.ini --steps K [--seeds N] [--out DIR] [--jobs J] [--json]\n"
         "  keel config keys [--json] | keel config show --config FILE [--set key=value]... [--json]\n"
         "  keel --version\n\n"
         "docs: README.md and docs/ (docs/cli.md lists every command and key)\n";
}

}  // namespace keel::cli

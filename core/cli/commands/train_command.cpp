// Why: `keel train --config FILE --run-dir DIR [--set k=v]... [--force]`: resolve the config, claim the run dir,
// record the resolved config beside the metrics, and run the loop.
#include <filesystem>
#include <fstream>
#include <iostream>

#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/train/run_dir.h"
#include "core/train/trainer.h"

namespace keel::cli {

int cmd_train(const Args& args) {
  std::string config_path, run_dir;
  std::vector<std::string> overrides;
  po::options_description options("keel train");
  add_config_options(options, config_path, overrides);
  options.add_options()
      ("run-dir", po::value<std::string>(&run_dir)->required(), "directory for metrics.h5, config.ini, checkpoints/")
      ("force", "replace an existing run in --run-dir")
      ("help", "show this help");
  auto vm = parse_args(args, options, "train");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  Config config = load_config(config_path, overrides);  // all config errors before touching the run dir
  if (config.train.device == "cuda" && !torch::cuda::is_available())
    throw std::runtime_error("train.device = cuda but no CUDA device is available to this build of keel");
  // Data next: an unprepared corpus is the most common first-run error; report it before claiming the run dir.
  auto loader = std::make_unique<data::DataLoader>(config, config.global_batch());
  train::RunPaths paths = train::create_run_dir(run_dir, vm.count("force") > 0);
  setup_logging(paths.log_file());
  {
    std::ofstream out(paths.config_ini());
    out << to_ini(config);
  }
  spdlog::info("keel {} train: config {} -> run dir {}", KEEL_VERSION, config_path, run_dir);
  train::install_stop_signal_handlers();
  train::Trainer trainer(config, paths, std::move(loader));
  const train::TrainSummary summary = trainer.train();
  spdlog::info("done: {} steps, loss {:.4f} -> {:.4f}{}", summary.steps_run, summary.first_loss, summary.last_loss,
               summary.stopped_by_signal ? " (stopped by signal)" : "");
  std::cout << "metrics:     " << summary.metrics_path << "\n"
            << "config:      " << paths.config_ini() << "\n"
            << "log:         " << paths.log_file() << "\n";
  return 0;
}

std::string usage() {
  return "keel " KEEL_VERSION " - LLM training-stability workbench\n\n"
         "usage:\n"
         "  keel train --config FILE --run-dir DIR [--set key=value]... [--force]\n"
         "  keel data prepare --config FILE [--set key=value]...\n"
         "  keel data show-batch --config FILE --step N [--set key=value]...\n"
         "  keel inspect RUN_DIR\n"
         "  keel config keys | keel config show --config FILE [--set key=value]...\n"
         "  keel --version\n\n"
         "docs: README.md and docs/ (docs/cli.md lists every command and key)\n";
}

}  // namespace keel::cli

// Why: see run_launcher.h.
#include "core/cli/commands/run_launcher.h"

#include <filesystem>
#include <fstream>
#include <iostream>

#include <spdlog/spdlog.h>

#include "core/cli/commands/common.h"
#include "core/metrics/hdf5_handle.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/run_dir.h"
#include "core/train/trainer.h"

namespace keel::cli {

int launch_run(RunRequest r) {
  { plugin_host::PluginHost probe(r.config); }  // a plugin that cannot load is refused before the run dir is claimed
  train::RunPaths paths = train::create_run_dir(r.run_dir, r.force);
  setup_logging(paths.log_file());
  {
    std::ofstream out(paths.config_ini());
    out << to_ini(r.config);
  }
  spdlog::info("keel {} {} -> run dir {}", KEEL_VERSION, r.description, r.run_dir);
  r.lineage.run_id = checkpoint::new_run_id();
  r.lineage.run_dir = r.run_dir;
  r.lineage.created = metrics::detail::utc_now_iso8601();
  train::install_stop_signal_handlers();
  train::Trainer trainer(r.config, paths, std::move(r.loader), r.lineage);
  if (r.resume) {
    try {
      trainer.restore(*r.resume, r.allow_data_change);
    } catch (...) {
      // Nothing was trained: leave no half-made run behind.
      for (const auto& path : {paths.config_ini(), paths.metrics_h5(), paths.lineage_json(), paths.checkpoints()})
        std::filesystem::remove_all(path);
      throw;
    }
  }
  const train::TrainSummary summary = trainer.train();
  spdlog::info("done: {} steps, loss {:.4f} -> {:.4f}{}", summary.steps_run, summary.first_loss, summary.last_loss,
               summary.stopped_by_signal ? " (stopped by signal)" : "");
  std::cout << "metrics:     " << summary.metrics_path << "\n"
            << "config:      " << paths.config_ini() << "\n"
            << "log:         " << paths.log_file() << "\n";
  if (!summary.last_checkpoint.empty()) std::cout << "checkpoint:  " << summary.last_checkpoint << "\n";
  return 0;
}

}  // namespace keel::cli

// Why: see run_launcher.h.
#include "core/cli/commands/run_launcher.h"

#include <filesystem>
#include <fstream>
#include <iostream>

#include <spdlog/spdlog.h>

#include "core/cli/commands/common.h"
#include "core/metrics/hdf5_handle.h"
#include "core/parallel/process_groups.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/run_dir.h"
#include "core/train/trainer.h"

namespace keel::cli {

int launch_run(RunRequest r) {
  // Join the job first (a single process joins a job of one): the layout must match the ranks started.
  const parallel::WorldInfo world = parallel::detect_world();
  const std::string backend = r.config.parallel.backend == "auto" ? (r.config.train.device == "cuda" ? "nccl" : "gloo")
                                                                  : r.config.parallel.backend;
  parallel::ProcessGroups groups = parallel::join_process_groups(world, r.config.parallel, backend);
  const bool rank0 = groups.is_rank0();
  const std::string rank_tag = world.distributed() ? "rank " + std::to_string(world.rank) : "";
  auto agree = [&](const std::string& error) {  // every rank fails with the first failing rank's message
    const auto errors = groups.world->all_gather_strings(error);
    for (size_t i = 0; i < errors.size(); ++i) {
      if (!errors[i].empty())
        throw std::runtime_error(world.distributed() ? groups.layout.describe_rank(static_cast<int64_t>(i)) + ": " + errors[i] : errors[i]);
    }
  };

  std::string error;
  try {
    plugin_host::PluginHost probe(r.config);  // a plugin that cannot load is refused before the run dir is claimed
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree(error);
  train::RunPaths paths{r.run_dir};
  if (rank0) {
    try {
      paths = train::create_run_dir(r.run_dir, r.force);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree(error);
  setup_logging(rank0 ? paths.log_file() : "", rank_tag);
  if (rank0) {
    std::ofstream out(paths.config_ini());
    out << to_ini(r.config);
  }
  spdlog::info("keel {} {} -> run dir {}", KEEL_VERSION, r.description, r.run_dir);
  r.lineage.run_id = groups.world->broadcast_string(checkpoint::new_run_id(), 0);
  r.lineage.run_dir = r.run_dir;
  r.lineage.created = metrics::detail::utc_now_iso8601();
  train::install_stop_signal_handlers();
  train::Trainer trainer(r.config, paths, std::move(r.loader), r.lineage, groups);
  if (r.resume) {
    try {
      trainer.restore(*r.resume, r.allow_data_change);
    } catch (const std::exception& e) {
      error = e.what();
    }
    try {
      agree(error);
    } catch (...) {
      // Nothing was trained: leave no half-made run behind.
      if (rank0) {
        for (const auto& path : {paths.config_ini(), paths.metrics_h5(), paths.lineage_json(), paths.checkpoints()})
          std::filesystem::remove_all(path);
      }
      throw;
    }
  }
  const train::TrainSummary summary = trainer.train();
  spdlog::info("done: {} steps, loss {:.4f} -> {:.4f}{}", summary.steps_run, summary.first_loss, summary.last_loss,
               summary.stopped_by_signal ? " (stopped by signal)" : "");
  if (rank0) {
    std::cout << "metrics:     " << summary.metrics_path << "\n"
              << "config:      " << paths.config_ini() << "\n"
              << "log:         " << paths.log_file() << "\n";
    if (!summary.last_checkpoint.empty()) std::cout << "checkpoint:  " << summary.last_checkpoint << "\n";
  }
  return 0;
}

}  // namespace keel::cli

// Why: see run_ranks.h.
#include "core/train/run_ranks.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "core/checkpoint/durable_fs.h"
#include "core/io/hdf5.h"
#include "core/metrics/logger.h"
#include "core/parallel/launcher.h"
#include "core/parallel/process_groups.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/run_dir.h"
#include "core/train/trainer.h"
#include "keel/version.h"

namespace keel::train {
namespace {

// Every rank fails with the first failing rank's message (so no rank is left waiting in a collective).
void agree_across_ranks(const parallel::ProcessGroups& groups, const std::string& local_error) {
  const auto errors = groups.world->all_gather_strings(local_error);
  for (size_t i = 0; i < errors.size(); ++i) {
    if (errors[i].empty()) continue;
    throw std::runtime_error(
        groups.world->single() ? errors[i] : groups.layout.describe_rank(static_cast<int64_t>(i)) + ": " + errors[i]);
  }
}

// Builds the trainer (restoring a checkpoint for a resume), trains, and says where everything went. A failure
// before the first step (the trainer cannot be built, the checkpoint does not fit) leaves nothing behind in
// the run dir; a failure after it keeps everything the run wrote, and the error goes to train.log too.
int train_and_report(RunRequest& r, const RunDirClaim& claim, const parallel::ProcessGroups& groups) {
  const bool rank0 = groups.is_rank0();
  const RunPaths& paths = claim.paths;
  std::unique_ptr<Trainer> trainer;
  std::string error;
  try {
    // The test-only fault seam (docs/testing.md); unset outside tests.
    const TestFault fault = parse_test_fault(std::getenv("KEEL_TEST_FAULT"));
    trainer = std::make_unique<Trainer>(r.config, paths, std::move(r.loader), r.lineage, groups, fault);
    if (r.resume) trainer->restore(*r.resume, r.allow_data_change);
  } catch (const parallel::DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    error = e.what();
  }
  try {
    agree_across_ranks(groups, error);
  } catch (...) {
    trainer.reset();  // closes metrics.h5 before it is removed
    if (rank0) remove_unstarted_run(claim);
    throw;
  }
  TrainSummary summary;
  try {
    summary = trainer->train();
  } catch (const parallel::DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    spdlog::error("the run stopped: {}", e.what());  // train.log keeps what stderr says
    throw;
  }
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

}  // namespace

int run_on_ranks(RunRequest r) {
  // Join the job first (a single process joins a job of one): the layout must match the ranks started.
  const parallel::WorldInfo world = parallel::detect_world();
  const std::string backend = r.config.parallel.backend == "auto"
                                  ? (r.config.train.device == Device::kCuda ? "nccl" : "gloo")
                                  : r.config.parallel.backend;
  const parallel::ProcessGroups groups = parallel::join_process_groups(world, r.config.parallel, backend);
  const bool rank0 = groups.is_rank0();
  // From here a stop signal is a request to stop at a step boundary, not a kill; before the run dir is claimed
  // it stops the command with nothing written.
  install_stop_signal_handlers();

  std::string error;
  try {
    plugin_host::PluginHost probe(r.config);  // a plugin that cannot load is refused before the run dir is claimed
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_across_ranks(groups, error);
  agree_across_ranks(groups,
                     stop_requested() ? "stopped by a signal before the run dir was claimed; nothing was written" : "");
  RunDirClaim claim;  // rank 0 holds the run dir's lock until the run ends
  claim.paths = RunPaths{r.run_dir};
  if (rank0) {  // rank 0 claims the run dir; the others write into it (rank files) or not at all
    try {
      claim = create_run_dir(r.run_dir, r.force);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_across_ranks(groups, error);
  const RunPaths& paths = claim.paths;
  // Under torchrun or srun every log line says its rank; keel launch already prefixes each line with it.
  const bool launcher_prefixes = std::getenv(parallel::kLauncherPrefixesOutputEnv) != nullptr;
  metrics::setup_logging(rank0 ? paths.log_file() : "",
                         world.distributed() && !launcher_prefixes ? "rank " + std::to_string(world.rank) : "");
  if (rank0) {
    try {
      checkpoint::write_file_atomically(paths.config_ini(), to_ini(r.config));
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  try {
    agree_across_ranks(groups, error);
  } catch (...) {
    if (rank0) remove_unstarted_run(claim);
    throw;
  }
  spdlog::info("keel {} {} -> run dir {}", KEEL_VERSION, r.description, r.run_dir);
  r.lineage.run_id = groups.world->broadcast_string(checkpoint::new_run_id(), 0);
  r.lineage.run_dir = r.run_dir;
  r.lineage.created = io::utc_now_iso8601();
  // A dead or hung rank: leave at once, before any destructor of the process groups can wait on it.
  try {
    return train_and_report(r, claim, groups);
  } catch (const parallel::DistributedError& e) {
    if (r.on_distributed_error) r.on_distributed_error(e.what());
    throw;
  }
}

}  // namespace keel::train

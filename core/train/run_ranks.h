// Why: `keel train` and `keel resume` end the same way on every rank of the job: choose the backend, join the
// process groups, claim the run dir, record the resolved config, start logging, build the trainer (restoring a
// checkpoint for a resume), run it and say where everything went. One function, so that both commands treat the
// run dir, signals and errors identically; the CLI only parses its flags into a RunRequest and calls it.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "core/checkpoint/lineage.h"
#include "core/config/config.h"
#include "core/data/loader.h"

namespace keel::checkpoint {
struct TrainingState;
}

namespace keel::train {

struct RunRequest {
  Config config;
  std::unique_ptr<data::DataLoader> loader;  // opened (and so validated) before the run dir is claimed
  std::string run_dir;
  bool force = false;
  checkpoint::Lineage lineage;                        // run_id/run_dir/created are filled in here
  const checkpoint::TrainingState* resume = nullptr;  // restore this first (keel resume): the checkpoint's full state
  bool allow_data_change = false;
  std::string description;  // for the log: "train: config FILE" / "resume: from DIR"
  // Called with the message when a rank of the job is dead or hung once the trainer is being built; it must not
  // return (the CLI prints its one line and leaves with std::_Exit) so that no destructor of the process groups
  // waits on the missing rank. Without it (or if it returns) the parallel::DistributedError is rethrown.
  std::function<void(const std::string& message)> on_distributed_error;
};

// In a multi-rank job (parallel/rendezvous.h) every rank calls this: it joins the process groups, rank 0 claims
// the run dir and the others use it; a failure on any rank before training (run dir, restore) stops every
// rank with that rank's message. Returns 0 when the run ends (all steps, or stopped by a signal); prints the
// paths of the run's metrics, config, log and last checkpoint on rank 0's stdout.
int run_on_ranks(RunRequest request);

}  // namespace keel::train

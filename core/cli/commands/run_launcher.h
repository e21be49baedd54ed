// Why: `keel train` and `keel resume` end the same way: claim the run dir, record the resolved config, start
// logging, build the trainer (restoring a checkpoint for a resume), run it and say where everything went.
// One function so that both commands treat the run dir, signals and errors identically.
#pragma once

#include <memory>
#include <string>

#include "core/checkpoint/lineage.h"
#include "core/config/config.h"
#include "core/data/loader.h"

namespace keel::checkpoint {
struct TrainingState;
}

namespace keel::cli {

struct RunRequest {
  Config config;
  std::unique_ptr<data::DataLoader> loader;  // opened (and so validated) before the run dir is claimed
  std::string run_dir;
  bool force = false;
  checkpoint::Lineage lineage;                        // run_id/run_dir/created are filled in here
  const checkpoint::TrainingState* resume = nullptr;  // restore this first (keel resume): the checkpoint's full state
  bool allow_data_change = false;
  std::string description;  // for the log: "train: config FILE" / "resume: from DIR"
};

// In a multi-rank job (parallel/rendezvous.h) every rank calls this: it joins the process groups, rank 0 claims
// the run dir and the others use it; a failure on any rank before training (run dir, restore) stops every
// rank with that rank's message.
int launch_run(RunRequest request);

}  // namespace keel::cli

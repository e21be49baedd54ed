// Why: the checkpoint glue of the trainer, in one file: what goes into a checkpoint (this rank's shards, its
// optimizer share, every plugin's state, RNG, data ledger, LR factor) and the directory protocol around it
// (rank 0 begins and commits, every rank writes its own file, no rank commits if any failed, then retention);
// loading a checkpoint's full state into the running model (checked before anything changes); and rolling
// back to the newest valid checkpoint when a spike handler asks. The file formats are core/checkpoint's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/checkpoint/training_state.h"
#include "core/train/trainer_state.h"

namespace keel::train {

// Saves a checkpoint of the current state (steps completed so far) unless one exists for this step; prunes.
// Every rank calls it. Returns the checkpoint's directory; throws CheckpointError naming the failing rank.
std::string save_checkpoint(TrainerState& s, const std::string& reason);

// Loads `st` (whole tensors: checkpoint::read_full_state) into the model, optimizer, data loader, RNG and, with
// `restore_plugins`, the other plugins; returns lines for the lineage. Names, shapes and dtypes are checked
// before anything changes; `origin` (the checkpoint directory) is named in every error.
std::vector<std::string> apply_checkpoint(TrainerState& s, const checkpoint::TrainingState& st,
                                          const std::string& origin, bool allow_data_change, bool restore_plugins);

// Back to the newest valid checkpoint at or before `step`, with the decision's intervention (skip rules,
// moment reset, LR factor); returns its step (or step + 1 when there is no checkpoint: the update is skipped).
int64_t roll_back(TrainerState& s, int64_t step, const StepRecord& record);

}  // namespace keel::train

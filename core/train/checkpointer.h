// Why: the checkpoint glue of the trainer, in one file: what goes into a checkpoint (this rank's shards, its
// optimizer share, every plugin's state, RNG, data ledger, LR factor) and the directory protocol around it
// (rank 0 begins and commits, every rank writes its own file, no rank commits if any failed, then retention),
// synchronously or, with checkpoint.async, through a background writer (async_saver.h);
// loading a checkpoint's full state into the running model (checked before anything changes); and rolling
// back to the newest valid checkpoint when a spike handler asks. The file formats are core/checkpoint's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/checkpoint/training_state.h"
#include "core/train/trainer_state.h"

namespace keel::train {

// kWait: the save is committed when save_checkpoint returns. kBackground with checkpoint.async = true: the state
// is copied to host memory and written by a background thread; finish_background_save commits it later.
enum class SaveMode { kWait, kBackground };

// Saves a checkpoint of the current state (steps completed so far) unless one exists for this step; prunes.
// Every rank calls it. A save still in flight is finished first (at most one in flight; saves commit in step
// order). Returns the checkpoint's directory (in the background mode, the one it will have once committed);
// throws CheckpointError naming the failing rank.
std::string save_checkpoint(TrainerState& s, const std::string& reason, SaveMode mode = SaveMode::kWait);

// At a step boundary, on every rank: commits the background save in flight once every rank's file is written,
// fsynced and hashed (one small collective per boundary while a save is in flight: no collective ever runs on
// the background thread), then prunes. With `wait`, blocks until the files are written. A write that failed on
// any rank throws CheckpointError naming the checkpoint and the rank, on every rank, and nothing is committed.
// Nothing in flight: returns at once, with no collective.
void finish_background_save(TrainerState& s, bool wait);

// Loads `st` (whole tensors: checkpoint::read_full_state) into the model, optimizer, data loader, RNG and, with
// `restore_plugins`, the other plugins; returns lines for the lineage. Names, shapes and dtypes are checked
// before anything changes; `origin` (the checkpoint directory) is named in every error.
std::vector<std::string> apply_checkpoint(TrainerState& s, const checkpoint::TrainingState& st,
                                          const std::string& origin, bool allow_data_change, bool restore_plugins);

// Back to the newest valid checkpoint at or before `step`, with the decision's intervention (skip rules,
// moment reset, LR factor); returns its step (or step + 1 when there is no checkpoint: the update is skipped).
int64_t roll_back(TrainerState& s, int64_t step, const StepRecord& record);

}  // namespace keel::train

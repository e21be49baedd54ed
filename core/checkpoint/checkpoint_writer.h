// Why: what a checkpoint of a run carries besides tensors (the LR schedule record, the manifest's description of
// the run) is decided here once, and a process that holds a run's whole state (`keel import-hf`) writes it
// through the same protocol the trainer's ranks use (CheckpointStore::begin, write_rank_file, config.ini,
// CheckpointStore::commit with SHA-256 of every file) instead of assembling its own. The trainer writes one
// file per rank (core/train/checkpointer.cpp); write_whole_checkpoint is the one-rank case.
#pragma once

#include <cstdint>
#include <string>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"

namespace keel::checkpoint {

// The checkpoint's "lr_schedule" JSON: the config's warm-up + cosine settings, the step the schedule continues
// at, the rollback LR factor in force and until which step (-1: none), and the lr_schedule plugin.
std::string lr_schedule_json(const Config& config, int64_t next_step, double lr_factor, int64_t lr_factor_until);

// A manifest describing a run of `config` (written as `config_ini`): version, creation time, run id, layout,
// SHA-256 of config.ini, the model.* keys, the data fingerprint and the lineage. Files are filled by commit().
Manifest run_manifest(const Config& config, const std::string& config_ini, const std::string& run_id,
                      const std::string& created, const Layout& layout, const std::string& data_fingerprint,
                      const std::string& lineage);

// Writes `state` (whole tensors) as the checkpoint STORE/step-N of a 1 x 1 x 1 layout: rank-00000.h5 and
// config.ini (state.config_ini) in STORE/step-N.tmp, then commit() with `manifest` (its layout must be
// 1 x 1 x 1). Returns the final directory; throws CheckpointError naming the file that failed.
std::string write_whole_checkpoint(CheckpointStore& store, int64_t step, const TrainingState& state,
                                   const Manifest& manifest);

}  // namespace keel::checkpoint

// Why: what a checkpoint of a run carries besides tensors (the LR schedule record, the manifest's description of
// the run) is decided here once, and a process that holds a run's whole state (`keel import-hf`) writes it
// through the same protocol the trainer's ranks use (CheckpointStore::begin, write_rank_file, config.ini,
// CheckpointStore::commit with SHA-256 of every file) instead of assembling its own. The trainer writes one
// file per rank (core/train/checkpointer.cpp); write_whole_checkpoint is the one-rank case. A state too large
// to hold (`keel import-hf` of a 7B model) is written by write_streamed_checkpoint: the rank file is written
// tensor by tensor as a source produces each one, so the writer holds one tensor at a time, and the file is the
// one write_whole_checkpoint would write for the same tensors (same objects, attributes and order).
#pragma once

#include <cstdint>
#include <functional>
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

// Tensor i of a list the streaming writer writes, produced when its turn comes (and dropped once written).
using TensorSource = std::function<at::Tensor(size_t index)>;

// write_rank_file (training_state.h) of a state whose model and optimizer tensors are produced one at a time:
// `state.model` / `state.optimizer` name them and give each one's shape and dtype (placeholders, e.g. meta
// tensors; their data is never read), `model(i)` / `optimizer(i)` produce tensor i as it is written. Each
// produced tensor must match its placeholder's shape and dtype and be finite, or CheckpointError naming it; the
// JSON texts are checked before the file is created, and a failure removes the file. Defined in
// training_state.cpp, which owns the rank-file layout.
void write_rank_file_streaming(const std::string& path, const TrainingState& state, RankInfo rank,
                               const TensorSource& model, const TensorSource& optimizer);

// write_whole_checkpoint through write_rank_file_streaming: peak memory is one tensor (plus its copy on the way
// to HDF5), not the state.
std::string write_streamed_checkpoint(CheckpointStore& store, int64_t step, const TrainingState& state,
                                      const Manifest& manifest, const TensorSource& model,
                                      const TensorSource& optimizer);

}  // namespace keel::checkpoint

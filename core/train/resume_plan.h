// Why: what `keel resume` may continue from, decided in one place and before anything is written. A resume is
// exact when nothing changes and a recorded branch when something does; every refusal happens here, in this
// order, before any tensor is read and before the new run dir is claimed:
//   1. (the caller) the checkpoint is resolved and verified (checkpoint::resolve_checkpoint: manifest + SHA-256
//      of every file; from a run dir, a damaged newest checkpoint is passed over with a warning, never silently
//      replaced by step 0), and the new run dir must not contain it;
//   2. the config is the checkpoint's own config.ini plus the overrides; a change to any model.* key is refused
//      with the key named (weights of another shape cannot be loaded); the global batch may change (train.
//      micro_batch, train.grad_accum, train.batch_schedule): the data ledger continues from its next sample;
//   3. the data must be the data the checkpoint was trained on: a different vocab or tokenizer is refused (hard),
//      a different corpus (shard sizes, EOS id) only with allow_data_change (soft), which the lineage records.
// Then every tensor is read and checked, and the lineage of the new branch is written down. The CLI
// (core/cli/commands/resume_command.cpp) only parses its flags, prints the warnings and hands the plan to
// train::run_on_ranks.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"
#include "core/data/loader.h"

namespace keel::train {

struct ResumePlan {
  Config config;                             // the checkpoint's config.ini plus the overrides
  std::unique_ptr<data::DataLoader> loader;  // the data, opened and checked against the checkpoint's fingerprint
  checkpoint::TrainingState state;  // placeholders (read_lazy_state); this rank's RNG when the layout is unchanged
  checkpoint::Lineage lineage;      // parent, config changes, notes (the checkpoint's warnings), data change allowed
};

// Plans a resume from the verified checkpoint `source` into `run_dir` with `overrides` ("section.key=value").
// Throws std::runtime_error when run_dir contains the checkpoint or train.device = cuda has no device,
// checkpoint::CheckpointError (one line naming the checkpoint dir and the key, or one line per data difference)
// for a refused change, ConfigError/DataError for a bad override or missing data.
ResumePlan plan_resume(const checkpoint::ResolvedCheckpoint& source, const std::string& run_dir,
                       const std::vector<std::string>& overrides, bool allow_data_change);

}  // namespace keel::train

// Why: a plugin that comes into a run later than step 0 (a resume, a branch, a `keel control` swap) must not
// silently differ from what the record says. Two things carry it across: (1) its library's identity, recorded in
// the lineage (path + SHA-256, hence in every checkpoint), so that a resume or swap warns, naming the plugin, when
// the file at that path is not the one the checkpoint ran with; (2) the run's recent history, handed through the
// SDK's optional warm-start hook (keel/plugin.h) to a plugin that starts without saved state, so that a spike
// handler added at a resume decides from the parent's last steps instead of letting the first spikes through.
// The history is read from metrics.h5 files along the lineage (the authoritative row of each step), by rank 0,
// and sent to every rank so that each rank's handler holds the same state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/checkpoint/lineage.h"
#include "core/checkpoint/training_state.h"
#include "core/train/trainer_state.h"
#include "keel/plugin.h"

namespace keel::train {

// One metrics.h5 to read history from: the rows of steps < before_step.
struct HistorySegment {
  std::string metrics_path;
  int64_t before_step = 0;
};

// Where the history before `start_step` lies: first `own_metrics` (this run's file, "" for none) up to start_step,
// then each ancestor's metrics.h5 up to its branch step, following `lineage` and the ancestors' lineage.json.
std::vector<HistorySegment> history_segments(const checkpoint::Lineage& lineage, const std::string& own_metrics,
                                             int64_t start_step);

// The newest `max_rows` steps (one row per step: the last row a file holds for it, e.g. the replay after a
// rollback) of the segments, oldest first. A segment that cannot be read ends the walk; `history.source` says
// what was read and what was missing.
sdk::WarmStartHistory read_history(const std::vector<HistorySegment>& segments, int64_t start_step,
                                   int64_t max_rows = sdk::kWarmStartMaxRows);

// The run's record of its loaded plugins (lineage.plugins): one entry per loaded library from `step` on.
void record_loaded_plugins(TrainerState& s, int64_t step);

// At a resume: warns (log line, `warning` event, lineage note) for each loaded plugin whose library at the path
// the checkpoint recorded has changed since; moves the records' from_step to the checkpoint's step; and warm
// starts `fresh` (the plugins not in the checkpoint) from the parent's history.
void continue_plugins_after_resume(TrainerState& s, const checkpoint::TrainingState& st,
                                   const std::vector<plugin_host::LoadedPlugin*>& fresh);

// At a swap before `step`, right after loading: when a library in `loaded` comes from a path this run loaded
// before and the file there has changed since, warns (log line, `warning` event naming the plugin) and throws,
// refusing the swap: this process's dynamic loader hands back the library it already mapped for that path, so
// the new file's code would not run although its SHA-256 would be recorded.
void refuse_changed_libraries(TrainerState& s, const std::vector<plugin_host::LoadedPlugin>& loaded, int64_t step);

// Records the swap of `slot` before `step` in lineage.plugins (the old libraries end, the new ones start).
void record_swap(TrainerState& s, const std::string& slot, const std::vector<plugin_host::LoadedPlugin>& loaded,
                 int64_t step);

// Hands each plugin in `fresh` the history before `start_step` (own_metrics: this run's file, flushed first, or
// ""): a `warm_start` event per plugin that got rows, a `warning` event and log line for one that stays inactive
// for some steps (no history), and a warning for a spike handler without the hook. Every rank calls it.
void warm_start_plugins(TrainerState& s, const std::vector<plugin_host::LoadedPlugin*>& fresh, int64_t start_step,
                        const std::string& own_metrics);

}  // namespace keel::train

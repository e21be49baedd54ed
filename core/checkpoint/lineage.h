// Why: a research run is a tree, not a line: a base run, continuations after a crash, and branches that change
// the learning rate, the data mix or a plugin from some checkpoint. Each run dir records where it came from
// (RUN_DIR/lineage.json, also inside every checkpoint), so `keel inspect` can draw the tree and a reader can
// tell exactly what differed at each branch. It also records each plugin library the run loaded, with its
// SHA-256, so that a resume can tell whether the code behind a plugin's name has changed since. Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace keel::checkpoint {

struct ConfigChange {
  std::string key;
  std::string from;
  std::string to;
};

// One plugin library a run loaded: what it is, where its file was and the SHA-256 of that file when it was
// loaded. A resume or swap compares the file now at `path` against `sha256` and warns when it changed.
struct PluginRecord {
  std::string slot;  // "spike_handler", ...
  std::string name;  // from the library's handshake
  std::string version;
  std::string path;         // absolute path of the library file
  std::string sha256;       // lower-case hex
  int64_t from_step = 0;    // loaded for this step on (the run's first step, or the step of a swap)
  int64_t until_step = -1;  // swapped out before this step; -1: still loaded
  bool loaded_at(int64_t step) const { return from_step <= step && (until_step < 0 || step < until_step); }
};

// A change of the global batch (sequences per step) from `step` on: train.batch_schedule, or a resume that set
// another train.micro_batch x train.grad_accum or schedule.
struct BatchChange {
  int64_t step = 0;
  int64_t from = 0;
  int64_t to = 0;
  std::string origin;  // "train.batch_schedule", "resume", ...
};

struct Lineage {
  std::string run_id;
  std::string run_dir;
  std::string created;        // UTC ISO 8601
  std::string parent_run_id;  // empty for a root run
  std::string parent_run_dir;
  std::string parent_checkpoint;      // checkpoint directory it resumed from
  int64_t parent_step = -1;           // steps completed in that checkpoint
  std::vector<ConfigChange> changes;  // config keys that differ from the parent checkpoint's config
  std::vector<std::string> notes;     // data-ledger changes, allowed data changes, skipped damaged checkpoints
  bool data_change_allowed = false;
  // Every plugin library this run loaded, in load order (swaps append; the swapped-out one gets until_step). The
  // copy inside a checkpoint therefore names exactly the libraries loaded when it was written.
  std::vector<PluginRecord> plugins;
  // Every change of the global batch in this run's own steps (its start step on), in step order; written to
  // lineage.json only when there is one.
  std::vector<BatchChange> batch_changes;

  bool is_root() const { return parent_run_id.empty(); }
  // "root", "continuation" (only run-length/logging keys changed) or "branch".
  std::string kind() const;
};

// "run-20261122T101500Z-3fa2c1" (time + 24 random bits).
std::string new_run_id();
std::string lineage_to_json(const Lineage& lineage);
// Throws CheckpointError naming `origin` and the field if malformed.
Lineage parse_lineage(const std::string& json_text, const std::string& origin);
// Keys whose values differ between two flattened configs (keys present on one side only count too).
std::vector<ConfigChange> diff_configs(const std::vector<std::pair<std::string, std::string>>& parent,
                                       const std::vector<std::pair<std::string, std::string>>& child);
// Keys that change how long a run goes or what it logs, not the trajectory: a resume changing only these is a
// "continuation".
bool is_operational_key(const std::string& key);
// The records of `plugins` loaded at `step` whose library at the same path has another SHA-256 now (or is gone),
// with one line each naming the plugin: "plugin zscore_skip (spike_handler): the library PATH has changed since
// WHEN (sha256 0123abcd... then, 4567ef01... now)". `now` maps each path to its SHA-256 today ("" when the file
// cannot be read); paths not in `now` are not checked.
std::vector<std::string> changed_plugin_libraries(const std::vector<PluginRecord>& plugins, int64_t step,
                                                  const std::vector<std::pair<std::string, std::string>>& now,
                                                  const std::string& since);

// The tree of `runs` (parents before children; runs whose parent is not in the set are roots, with the
// parent named), one run per line with its kind, branch step and changes.
std::string format_lineage_tree(const std::vector<Lineage>& runs);

}  // namespace keel::checkpoint

// Why: a research run is a tree, not a line: a base run, continuations after a crash, and branches that change
// the learning rate, the data mix or a plugin from some checkpoint. Each run dir records where it came from
// (RUN_DIR/lineage.json, also inside every checkpoint), so `keel inspect` can draw the tree and a reader can
// tell exactly what differed at each branch. Torch-free.
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
// The tree of `runs` (parents before children; runs whose parent is not in the set are roots, with the
// parent named), one run per line with its kind, branch step and changes.
std::string format_lineage_tree(const std::vector<Lineage>& runs);

}  // namespace keel::checkpoint

// Why: the data order of a run that branched, swapped a mixture plugin mid-run or rolled back is no longer the
// order its config alone gives. It is fully recorded, though: the run's lineage names the checkpoint it started
// from (whose data ledger holds the cursors at the branch step), and the run's newest checkpoint's ledger holds
// every mixture stage and skip rule of its surviving history, each with the step it applies from. RunOrder
// replays exactly that: start from the run's newest checkpoint at or before the step asked for (else from the
// branch ledger, adopting the run's config as the trainer did at resume, or from step 0), put the newest ledger's
// mixture history and skip rules in force, and plan forward. Steps before the branch point are the parent run's. `keel
// data show-batch --run` prints these plans; `keel data compare-order` compares two runs' recorded batches (metrics.h5
// /data/batch) slot by slot after their common branch point.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config/config.h"
#include "core/data/loader.h"

namespace keel::data {

class RunOrder {
 public:
  // Opens RUN_DIR (its lineage.json, config.ini with `overrides` applied, and checkpoints). Throws DataError naming
  // the file that is missing or malformed.
  explicit RunOrder(const std::string& run_dir, const std::vector<std::string>& overrides = {});
  ~RunOrder();

  // The plans of steps [first, last] as the run trained them (steps before its branch point from the parent run).
  // Throws DataError if first < 0, last < first, or a step precedes the branch point and the parent run dir is gone.
  std::vector<BatchPlan> plans(int64_t first, int64_t last) const;
  // The normalized weights in force at `step` (the run's final mixture history).
  std::vector<double> weights_at(int64_t step) const;
  // A loader of the run's data (for tokens, documents, decoding), not positioned at any particular step.
  const DataLoader& loader() const { return *loader_; }
  const keel::Config& config() const { return config_; }
  const std::string& run_dir() const { return run_dir_; }
  int64_t start_step() const { return start_step_; }  // the branch point: 0 for a root run
  const std::string& parent_run_dir() const { return parent_run_dir_; }
  // The newest checkpoint whose ledger supplied the history ("" when the run has none).
  const std::string& history_checkpoint() const { return history_checkpoint_; }

 private:
  // A loader at the run's newest checkpoint at or before `step` (else at its start) with the final history in
  // force. Throws DataError when neither that checkpoint nor the parent checkpoint exists.
  std::unique_ptr<DataLoader> start_loader(int64_t step) const;

  std::string run_dir_;
  std::vector<std::string> overrides_;
  keel::Config config_;
  int64_t start_step_ = 0;
  std::string parent_run_dir_;
  std::string parent_checkpoint_;
  bool data_change_allowed_ = false;
  std::vector<std::pair<int64_t, std::string>> checkpoints_;  // the run's valid checkpoints (step, dir), oldest first
  std::string history_checkpoint_;
  std::unique_ptr<nlohmann::json> final_ledger_;  // the newest checkpoint's ledger; null without checkpoints
  std::unique_ptr<DataLoader> loader_;            // the final history in force (weights, tokens, decoding)
};

// The data ledger (JSON) of a checkpoint directory, read from its rank-0 file after verifying the directory.
nlohmann::json read_checkpoint_ledger(const std::string& checkpoint_dir);

// P(same source) for one slot when arm A picks with weights `a` and arm B with `b` under the Gumbel-max coupling
// (docs/data.md): sum over i with a_i, b_i > 0 of 1 / sum_j max(a_j / a_i, b_j / b_i). Weights need not be
// normalized. 0.5/0.5 vs 0.3/0.7 gives 0.8.
double expected_same_source_share(const std::vector<double>& a, const std::vector<double>& b);

// `keel data compare-order RUN_A RUN_B [--steps S..E] --json`: over the steps both runs trained (their /data/batch
// records) from their common branch point on (within `steps` when given): {"slots", "steps", "branch_step",
// "common_ancestor", "same_source_share", "expected_same_source_share", "sources": {NAME: {"same_source",
// "same_sample"}}}. Throws DataError when a run has no /data/batch or the runs share no step.
nlohmann::json compare_order(const std::string& run_a, const std::string& run_b,
                             std::optional<std::pair<int64_t, int64_t>> steps);

}  // namespace keel::data

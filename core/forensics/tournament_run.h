// Why: the running half of `keel tournament` (tournament.h holds the arms file and the statistics). Every arm of
// every replicate is a branch `keel resume --from CKPT --run-dir OUT/ARM-seedI` (so it has a lineage and is an
// ordinary run dir that `keel report`, `keel eval` and `keel data compare-order` read), started as a child
// process, J at a time; then each branch's end checkpoint is measured the same way: the per-window NLL of the
// held-out split, or, when no source has held-out documents, the per-sample training loss of its last steps.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/forensics/tournament.h"

namespace keel::forensics {

struct TournamentSetup {
  std::string keel;         // the keel binary the branches run
  std::string checkpoint;   // resolved checkpoint dir
  int64_t from_step = 0;    // its step
  int64_t steps = 0;        // K: steps every branch trains
  int64_t seeds = 1;        // replicates
  int64_t jobs = 1;         // branches at once
  int64_t world = 1;        // ranks of the checkpoint's layout (> 1: each branch through keel launch)
  int64_t decay_steps = 0;  // the checkpoint run's LR schedule length, pinned in every branch
  std::string out;          // OUT
  std::vector<Arm> arms;
  std::vector<std::string> replicate_skip;  // per replicate: its data.skip ("" for replicate 0)
  std::string parent_skip;                  // the checkpoint config's data.skip (kept in front of a replicate's)
};

struct Branch {
  size_t arm = 0;
  int64_t seed = 0;
  std::string run_dir, log;
};

// OUT/ARM-seedI and OUT/logs/ARM-seedI.log for every arm and replicate, arm-major.
std::vector<Branch> plan_branches(const TournamentSetup& setup);

// The argv of one branch (its own flags first, then the arm's, which win).
std::vector<std::string> branch_command(const TournamentSetup& setup, const Branch& branch);

// Runs every branch, setup.jobs at a time, each with stdout and stderr into its log. A failed branch stops new
// starts, the running ones finish, and TournamentError names every failed arm, its exit status and its log's end.
void run_branches(const TournamentSetup& setup, const std::vector<Branch>& branches);

// How the branches are compared, and the units of each branch (same count and order in every branch).
struct Measurement {
  std::string kind;                        // "heldout" or "train_loss"
  std::string description;                 // one line for the table and the JSON
  std::vector<std::vector<double>> units;  // per branch (plan_branches' order)
};
// Held-out: up to `windows` windows of every source with a held-out set (sources without one are named in the
// description), scored by each branch's end checkpoint in fp32. Else: every sample's loss in each branch's last
// min(K, 10) logged steps (metrics.h5 /data/sample_loss), also when `train_loss` asks for it. Throws naming the
// branch when a measurement fails.
Measurement measure_branches(const TournamentSetup& setup, const std::vector<Branch>& branches, int64_t windows,
                             bool train_loss = false);

}  // namespace keel::forensics

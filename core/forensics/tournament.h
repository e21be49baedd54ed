// Why: after a loss spike the question is not "which remediation exists" but "which one works here": `keel
// tournament` resumes one checkpoint once per remediation arm, on paired data, evaluates every arm the same way
// and names the winner with a stated paired test and its interval (docs/forensics.md, "keel tournament"). This
// file holds the parts that need no LibTorch and are unit-tested on their own: the arms file (every key, its
// shorthands and their file:line errors), the replicates' data offsets, and the paired statistics with the
// verdict. Running the arms and measuring them is tournament_run.h's job.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::forensics {

// A malformed arms file or tournament input; the message starts with "FILE:LINE: " where a line is to blame.
struct TournamentError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One line of an arm's section, expanded into what `keel resume` is given.
struct ArmEntry {
  int line = 0;                          // 1-based line in the arms file
  std::string text;                      // "key = value" as written (for the table, the JSON and errors)
  std::vector<std::string> overrides;    // config overrides "section.key=value"
  std::vector<std::string> plugins;      // "SLOT=NAME_OR_PATH"
  std::vector<std::string> plugin_args;  // "NAME.key=value"
};

struct Arm {
  std::string name;  // [arm.NAME]
  int line = 0;      // line of the section header
  bool baseline = false;
  std::vector<ArmEntry> entries;  // in file order

  std::vector<std::string> overrides() const;  // every entry's, in order
  std::vector<std::string> plugins() const;
  std::vector<std::string> plugin_args() const;
};

// The keys of an [arm.NAME] section (docs/forensics.md lists them with what they expand to):
//   baseline = true                the control arm (else the arm named `baseline`); exactly one
//   set = k=v [k=v ...]            config overrides (repeatable)
//   plugin = SLOT=NAME [...]       a plugin, built-in name or path to a .so (repeatable)
//   plugin_arg = NAME.k=v [...]    its arguments (repeatable)
//   skip_spikes = true             skip the update of a spiking step: spike_handler = zscore_skip
//   skip_spikes_threshold = Z      ... with z-score threshold Z (default 6)
//   lr_factor = F                  LR x F for lr_steps steps from a detected spike: spike_handler = lr_cooldown
//   lr_steps = K                   ... for K steps (default 50)
//   eps = E                        optim.eps = E (raise AdamW's epsilon)
//   update_clip = R                clip each tensor's update RMS at R: grad_transform = update_clip
//   rollback = true                on a spike, roll back and skip the batch's chunks: spike_handler = rollback_skip
//   reset_moments = GLOB[,GLOB]    zero both Adam moments of the matching tensors: spike_handler = moment_surgery
//                                  (first = second = 0), at the resume's first step
//   scale_moments = GLOB:F1:F2     multiply them by F1 (first moment) and F2 (second): moment_surgery
//   moments_at = resume|spike      ... at the resume (default) or at every detected spike (then the update is skipped)
//   embedding_grad_shrink = A      shrink the embedding gradient by A: grad_transform = embedding_grad_shrink
// A section other than [arm.NAME], an unknown key, a bad value, two arms of one name, two shorthands that need
// the same single slot (spike_handler), fewer than two arms or no baseline are refused as "FILE:LINE: ...".
std::vector<Arm> parse_arms(const std::string& text, const std::string& path);
std::vector<Arm> read_arms(const std::string& path);  // reads the file; a missing one is refused naming it

// Index of the baseline arm in `arms` (parse_arms guarantees one).
size_t baseline_index(const std::vector<Arm>& arms);

// Where a source's cursor stands in the checkpoint (the data ledger's "sources" entries).
struct SourceCursor {
  std::string name;
  int64_t position = 0;           // in the current epoch's order
  int64_t samples_per_epoch = 0;  // positions of an epoch
};
std::vector<SourceCursor> ledger_cursors(const std::string& data_ledger_json);

// The data.skip rules that move replicate `replicate` (0-based) of `replicates` a share replicate/replicates of
// an epoch ahead in every source: the whole chunks from each cursor's chunk on (wrapping at the epoch's end).
// Replicate 0 gets "" (the checkpoint's own data order). Refused when replicates > chunks.
std::string replicate_skip_rules(const std::vector<SourceCursor>& cursors, int64_t chunks, int64_t replicate,
                                 int64_t replicates);

// The measured value of every unit (a held-out window or a trained sample, times a replicate) per arm; units are
// paired: unit u of every arm is the same window (or batch slot) of the same replicate.
struct ArmScores {
  std::string name;
  std::vector<double> units;
};

struct PairedDiff {
  double mean = 0.0;          // mean over units of (a - b)
  double lo = 0.0, hi = 0.0;  // 95% percentile interval of the paired bootstrap
};

// Paired bootstrap over units: `resamples` draws of U unit indices with replacement (mt19937_64 seeded with
// `seed`, so the interval is reproducible), the mean of a - b on each, the 2.5th and 97.5th percentiles.
// Throws TournamentError for units of different counts or none.
PairedDiff paired_bootstrap(const std::vector<double>& a, const std::vector<double>& b, int64_t resamples,
                            uint64_t seed);

struct TournamentVerdict {
  std::vector<double> mean;             // per arm, mean over units
  std::vector<PairedDiff> vs_baseline;  // per arm (the baseline's own is all zero)
  size_t best = 0, runner_up = 0;       // lowest and second-lowest mean
  PairedDiff best_vs_runner_up;
  bool clear = false;  // the interval of best - runner-up lies below 0
};
TournamentVerdict decide(const std::vector<ArmScores>& arms, size_t baseline, int64_t resamples, uint64_t seed);

// The readable table (OUT/tournament.txt) of a tournament.json object (tournament_json's layout).
std::string format_table(const nlohmann::json& result);

}  // namespace keel::forensics

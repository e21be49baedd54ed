// Why: a skip rule is a decision about data ("this batch made the loss spike: never train on it again") and must
// outlive the ledger reloads that a rollback or a resume makes. A checkpoint's ledger holds only the rules added
// before it was written, so each reload would forget the later ones: rollback 2 would replay the batch rollback 1
// skipped. A rollback keeps the rules in force before it (loader.h carry_skip); rank 0 records the whole skip
// list in RUN_DIR/skip_rules.json after each rollback, and a resume carries the parent run's recorded rules into
// the checkpoint's ledger, so that rules added after the parent's newest checkpoint are not lost either.
#pragma once

#include <string>
#include <vector>

namespace keel::train {

struct TrainerState;

// RUN_DIR/skip_rules.json: {"format": "keel-skip-rules", "version": 1, "step": N, "skip": [ledger skip list]}.
std::string skip_rules_file(const std::string& run_dir);
// Rank 0 writes the loader's skip list to the run's skip_rules.json (atomically).
void record_skip_rules(TrainerState& s);
// At a resume, after the checkpoint's ledger is loaded: carries the rules of the parent run's skip_rules.json (if
// any) that the ledger lacks, each from max(its from_step, the resume step). Returns a line per rule kept; an
// unreadable file gives a warning line (logged) and carries nothing. Every rank gets rank 0's reading.
std::vector<std::string> carry_parent_skip_rules(TrainerState& s);

// `keel resume --skip-list FILE` (a skip list `keel forensics` wrote, or one by hand): the rules of FILE in the
// data.skip format ("prose:chunk:3;code:samples:100-163"), one or more per line separated by ';', blank lines and
// '#' comments ignored; each is checked against `sources` and returned in canonical form ("code:samples:100-163").
// Throws std::runtime_error "FILE:LINE: ..." for a bad rule, "FILE: ..." when it cannot be read or holds no rule.
std::vector<std::string> read_skip_list(const std::string& path, const std::vector<std::string>& sources);
// The lineage note of a resume given a skip list begins with this; the resume then records its skip rules in
// RUN_DIR/skip_rules.json at once (record_skip_list), so the run dir says what it skips before its first checkpoint.
inline constexpr const char* kSkipListNote = "skip list ";
// Rank 0 writes skip_rules.json when the lineage has a kSkipListNote note (called once the resume's data ledger holds
// every rule: the checkpoint's, the parent's carried ones and the config's).
void record_skip_list(TrainerState& s);

}  // namespace keel::train

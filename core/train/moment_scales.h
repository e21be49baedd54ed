// Why: moment surgery — rescaling or zeroing the optimizer's first and second moments of some tensors — is the
// remedy a stability researcher reaches for after a spike or at a resume (the tensors whose Adam second moment
// collapsed, the attention of one block), and it must be applied exactly, to exactly the named tensors, and be on
// record. A spike handler asks for it through Decision::moment_scales ("GLOB:FIRST:SECOND;..."); this file parses
// that text, checks it against the model's tensor names, and applies it through the optimizer plugin's own
// state (save_state / load_state): "<param>/exp_avg" is a first moment, "<param>/exp_avg_sq" a second one
// (docs/plugins.md, "Moment surgery").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/train/trainer_state.h"

namespace keel::train {

// One entry of moment_scales: the params whose names match `glob` ('*' any run of characters, '?' one, '[...]' a
// class, as fnmatch(3)) get their first moments multiplied by `first` and their second ones by `second`.
struct MomentScale {
  std::string glob;
  double first = 1.0;
  double second = 1.0;
};

// Parses "GLOB:FIRST:SECOND;GLOB:FIRST:SECOND..." (FIRST, SECOND finite and >= 0; 0 resets). With `names`
// non-empty each GLOB must match at least one of them. Throws std::invalid_argument saying what is wrong.
std::vector<MomentScale> parse_moment_scales(const std::string& text, const std::vector<std::string>& names);

// The entry that decides param `name`: the first whose glob matches it, or nullptr.
const MomentScale* moment_scale_for(const std::vector<MomentScale>& scales, const std::string& name);

// Counts of what apply_moment_scales changed on this rank.
struct MomentSurgery {
  int64_t first_tensors = 0;   // "<param>/exp_avg" tensors multiplied (or zeroed)
  int64_t second_tensors = 0;  // "<param>/exp_avg_sq" tensors multiplied (or zeroed)
};

// Applies `scales` to the state of `optimizer` (its save_state tensors, changed and handed back through
// load_state); a factor of 0 zeroes the tensor (NaN included). Throws std::runtime_error naming the optimizer
// when a factor other than 1 asks for a kind of moment its state has none of (lion keeps no exp_avg_sq).
MomentSurgery apply_moment_scales(sdk::Plugin& optimizer, const std::string& optimizer_name,
                                  const std::vector<MomentScale>& scales);

// A spike handler's moment_scales at `step`: throws plugin_host::PluginError naming `plugin`, the step and the
// text when it does not parse or a glob matches no tensor of the model (called before the decision crosses ranks).
void check_moment_scales(const std::string& text, const std::string& plugin, int64_t step,
                         const std::vector<std::string>& tensor_names);

// Applies the decision's moment_scales to this rank's optimizer and returns one line for events and the lineage,
// e.g. "moment scales 'blocks.*:0:0' (by moment_surgery): 12 of 20 tensors matched; exp_avg x0, exp_avg_sq x0 in
// optimizer adamw". Errors name the optimizer and the plugin that asked.
std::string apply_decision_moment_scales(TrainerState& s, const std::string& text, const std::string& decided_by);

}  // namespace keel::train

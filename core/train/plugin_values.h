// Why: a value a plugin hands back crosses into the trainer's state, and one bad number (a NaN learning rate,
// an LR factor of -1) poisons every weight without any error. Every value a plugin returns is checked here, at
// the hook boundary, against its documented range (docs/plugins.md), and a violation stops the run with a
// PluginError naming the plugin, its hook, the step and the value. One file, so the ranges live in one place.
#pragma once

#include <keel/plugin.h>

#include <cstdint>
#include <string>
#include <vector>

namespace keel::train {

// lr_schedule's learning_rate(): finite and >= 0.
void check_learning_rate(double lr, const std::string& plugin, int64_t step);
// spike_handler's decide(): a known action; lr_factor finite and > 0; lr_factor_steps >= 0; skip_data (when
// set) parses as skip rules over `sources`.
void check_decision(const sdk::Decision& decision, const std::string& plugin, int64_t step,
                    const std::vector<std::string>& sources);
// data_mixture's mixture_at(): "" (no change) or weights that parse over `sources` (finite, >= 0, sum > 0).
void check_mixture(const std::string& weights, const std::string& plugin, int64_t step,
                   const std::vector<std::string>& sources);

}  // namespace keel::train

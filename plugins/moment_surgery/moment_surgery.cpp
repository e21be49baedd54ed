// Why: after a spike, or when a run is resumed to be nursed past one, a researcher wants to reset or rescale the
// optimizer's moments of some tensors — the second moments of the attention that collapsed, all first moments —
// without touching the rest, exactly, and on record. Keel applies such surgery when the step decision asks for it
// (Decision::moment_scales, "GLOB:FIRST:SECOND;...": the first moments "<param>/exp_avg" of every param whose
// name matches GLOB are multiplied by FIRST, the second moments "<param>/exp_avg_sq" by SECOND; 0 resets); only a
// spike handler returns a decision, so this plugin fills the spike_handler slot. It asks for the surgery:
//   at = resume: once, at the first step it decides (the first step of a resume that loads it, after its warm
//                start), unless its saved state says it already did (so resuming a branch does not repeat it);
//   at = step:   once, at the first step >= `step` it decides;
//   at = spike:  at every spike of the shared detector (plugins/common/spike_window.h; window, min_history,
//                threshold as zscore_skip), with the detector's windows in its state and warm started.
// The firing step's own update is kept (action = continue, the default for resume and step) or skipped
// (action = skip, the default for spike); at = spike may also roll back (action = rollback: Keel reloads the
// newest checkpoint at or before the step and applies the surgery after the reload).
// The moment_scales text is one entry per glob of `pattern` (comma-separated), each with FIRST = `first` and
// SECOND = `second` (numbers written with 17 significant digits, so Keel applies exactly these factors).
// Arguments: at (resume), pattern (*), first (1), second (1; at least one of first, second must differ from 1),
// step (at = step only, required), action (continue | skip; spike: skip | continue | rollback),
// window (50), min_history (10), threshold (6.0) (at = spike only).
// State: {"fired": N, "last_fired_step": S} and, at = spike, the detector's windows.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/spike_window.h"
#include "../common/warm_start.h"
#include "keel/plugin.h"

namespace {

using keel::sdk::Args;
using keel::sdk::Decision;

std::string exact(double v) {
  char text[40];
  std::snprintf(text, sizeof(text), "%.17g", v);
  return text;
}

[[noreturn]] void refuse(const std::string& why) { throw std::invalid_argument("moment_surgery: " + why); }

// The arguments, checked; every error names the argument.
struct Options {
  std::string at;
  std::vector<std::string> globs;
  double first = 1.0, second = 1.0;
  int64_t step = -1;
  Decision::Action action = Decision::Action::kContinue;
  keel::plugins::SpikeDetectorOptions detector;
};

std::vector<std::string> split_globs(const std::string& pattern) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= pattern.size()) {
    size_t end = pattern.find(',', begin);
    if (end == std::string::npos) end = pattern.size();
    std::string glob = pattern.substr(begin, end - begin);
    while (!glob.empty() && glob.front() == ' ') glob.erase(glob.begin());
    while (!glob.empty() && glob.back() == ' ') glob.pop_back();
    if (glob.empty()) refuse("argument 'pattern' = '" + pattern + "' has an empty glob");
    if (glob.find_first_of(":;") != std::string::npos)
      refuse("argument 'pattern' glob '" + glob + "' holds ':' or ';'");
    out.push_back(glob);
    begin = end + 1;
  }
  return out;
}

double factor(const Args& args, const char* key) {
  const double v = keel::sdk::arg_double(args, key, 1.0);
  if (!std::isfinite(v) || v < 0)
    refuse(std::string("argument '") + key + "' must be a finite number >= 0, got " + args.at(key));
  return v;
}

Options parse_options(const Args& args) {
  keel::sdk::require_known_args(
      args, {"at", "pattern", "first", "second", "step", "action", "window", "min_history", "threshold"});
  Options o;
  o.at = keel::sdk::arg_string(args, "at", "resume");
  if (o.at != "resume" && o.at != "step" && o.at != "spike")
    refuse("argument 'at' must be resume, step or spike, got '" + o.at + "'");
  o.globs = split_globs(keel::sdk::arg_string(args, "pattern", "*"));
  o.first = factor(args, "first");
  o.second = factor(args, "second");
  if (o.first == 1.0 && o.second == 1.0)
    refuse("arguments 'first' and 'second' are both 1, which changes nothing (0 resets, 0.5 halves)");
  // Lion keeps no second moment: refuse here rather than at the first firing, deep into a run.
  if (o.second != 1.0 && keel::sdk::arg_string(args, "plugins.optimizer", "") == "lion")
    refuse("argument 'second' = " + args.at("second") +
           " asks for second moments, but optimizer lion keeps none (plugins.optimizer = lion)");
  if (o.at == "step") {
    if (args.count("step") == 0) refuse("argument 'step' is required with at = step");
    o.step = keel::sdk::arg_int(args, "step", -1);
    if (o.step < 0) refuse("argument 'step' must be >= 0, got " + args.at("step"));
  } else if (args.count("step") != 0) {
    refuse("argument 'step' is only for at = step (at = " + o.at + ")");
  }
  if (o.at != "spike") {
    for (const char* key : {"window", "min_history", "threshold"})
      if (args.count(key) != 0)
        refuse(std::string("argument '") + key + "' is only for at = spike (at = " + o.at + ")");
  }
  o.detector = keel::plugins::spike_detector_options(args, "moment_surgery");
  const std::string action = keel::sdk::arg_string(args, "action", o.at == "spike" ? "skip" : "continue");
  if (action == "continue") {
    o.action = Decision::Action::kContinue;
  } else if (action == "skip") {
    o.action = Decision::Action::kSkipUpdate;
  } else if (action == "rollback" && o.at == "spike") {
    o.action = Decision::Action::kRollback;
  } else {
    refuse("argument 'action' must be continue or skip" + std::string(o.at == "spike" ? " or rollback" : "") +
           " with at = " + o.at + ", got '" + action + "'");
  }
  return o;
}

class MomentSurgery : public keel::sdk::Plugin {
 public:
  explicit MomentSurgery(const Args& args) : options_(parse_options(args)), detector_(options_.detector) {}

  Decision decide(const keel::sdk::StepContext& ctx) override {
    std::string why;
    if (options_.at == "spike") {
      const auto spike = detector_.observe(ctx);
      if (!spike) return {};
      why = "step " + std::to_string(ctx.step) + ": " + spike->reason;
    } else if (fired_ > 0 || (options_.at == "step" && ctx.step < options_.step)) {
      return {};
    } else {
      why = options_.at == "resume"
                ? "first step of this plugin (at = resume), step " + std::to_string(ctx.step)
                : "step " + std::to_string(ctx.step) + " (at = step, step = " + std::to_string(options_.step) + ")";
    }
    ++fired_;
    last_fired_step_ = ctx.step;
    ctx.metric("fired", 1.0);
    Decision d;
    d.action = options_.action;
    d.moment_scales = moment_scales();
    d.reason = "moment surgery " + d.moment_scales + ": " + why;
    return d;
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json =
        "{\"fired\": " + std::to_string(fired_) + ", \"last_fired_step\": " + std::to_string(last_fired_step_) + "}";
    if (options_.at == "spike") detector_.save(state);
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    fired_ = keel::sdk::json_int(state.json, "fired", 0);
    last_fired_step_ = keel::sdk::json_int(state.json, "last_fired_step", -1);
    if (options_.at == "spike") detector_.load(state);
  }

  // Only at = spike decides from history; the other modes have nothing to warm up.
  keel::sdk::WarmStartResult warm_start(const keel::sdk::WarmStartHistory& history) {
    if (options_.at != "spike") return {};
    return keel::plugins::warm_start_detector(detector_, history);
  }

 private:
  std::string moment_scales() const {
    std::string text;
    for (const auto& glob : options_.globs)
      text += (text.empty() ? "" : ";") + glob + ":" + exact(options_.first) + ":" + exact(options_.second);
    return text;
  }

  Options options_;
  keel::plugins::SpikeDetector detector_;
  int64_t fired_ = 0;             // times it asked for the surgery (saved)
  int64_t last_fired_step_ = -1;  // the step of the last one (saved; -1 = none)
};

}  // namespace

KEEL_PLUGIN(MomentSurgery, "moment_surgery", "1.0", keel::sdk::kSpikeHandler,
            "resets or rescales the optimizer's first/second moments of tensors matching a pattern, at a resume, "
            "a step or a spike")
KEEL_PLUGIN_WARM_START(MomentSurgery)

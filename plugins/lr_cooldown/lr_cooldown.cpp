// Why: a gentler answer to a loss spike than skipping or rolling back: keep the step, but lower the learning
// rate for a while so the optimizer settles (the "reduce LR and continue" intervention of large-run logbooks such
// as OPT-175B's). Detection is shared with zscore_skip (plugins/common/spike_window.h); on a spike this handler
// returns Action::kContinue with lr_factor = `lr_factor` and lr_factor_steps = `cooldown_steps`, so Keel
// multiplies the LR by lr_factor for that many steps from this one (a new spike during a cooldown asks for a
// fresh cooldown from its own step). It never skips and never rolls back; ordinary steps return the plain
// kContinue (lr_factor 1, lr_factor_steps 0 = no new intervention).
// Arguments: window (50), min_history (10), threshold (6.0), lr_factor (0.3, in (0, 1]), cooldown_steps (50, >= 1).
#include <ATen/ATen.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "../common/spike_window.h"
#include "../common/warm_start.h"
#include "keel/plugin.h"

namespace {

class LrCooldown : public keel::sdk::Plugin {
 public:
  explicit LrCooldown(const keel::sdk::Args& args)
      : detector_(checked_options(args)),
        lr_factor_(keel::sdk::arg_double(args, "lr_factor", 0.3)),
        cooldown_steps_(keel::sdk::arg_int(args, "cooldown_steps", 50)) {
    if (!(lr_factor_ > 0 && lr_factor_ <= 1)) {
      throw std::invalid_argument("lr_cooldown: argument 'lr_factor' must be in (0, 1], got " +
                                  keel::plugins::short_number(lr_factor_));
    }
    if (cooldown_steps_ < 1) {
      throw std::invalid_argument("lr_cooldown: argument 'cooldown_steps' must be >= 1, got " +
                                  std::to_string(cooldown_steps_));
    }
  }

  keel::sdk::Decision decide(const keel::sdk::StepContext& ctx) override {
    const auto spike = detector_.observe(ctx);
    if (!spike) return {};
    ++cooldowns_;
    keel::sdk::Decision d;  // Action::kContinue: the update is applied
    d.reason = "step " + std::to_string(ctx.step) + ": " + spike->reason + "; LR x" +
               keel::plugins::short_number(lr_factor_) + " for " + std::to_string(cooldown_steps_) + " steps";
    d.lr_factor = lr_factor_;
    d.lr_factor_steps = cooldown_steps_;
    return d;
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json = "{\"cooldowns\": " + std::to_string(cooldowns_) + "}";
    detector_.save(state);
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    cooldowns_ = keel::sdk::json_int(state.json, "cooldowns", 0);
    detector_.load(state);
  }

  // Keel's warm-start hook (KEEL_PLUGIN_WARM_START below): a start without saved state on a resumed or branched
  // run replays the run's recorded history through the detector.
  keel::sdk::WarmStartResult warm_start(const keel::sdk::WarmStartHistory& history) {
    return keel::plugins::warm_start_detector(detector_, history);
  }

 private:
  static keel::plugins::SpikeDetectorOptions checked_options(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"window", "min_history", "threshold", "lr_factor", "cooldown_steps"});
    return keel::plugins::spike_detector_options(args, "lr_cooldown");
  }

  keel::plugins::SpikeDetector detector_;
  double lr_factor_;
  int64_t cooldown_steps_;
  int64_t cooldowns_ = 0;  // cooldowns asked for so far (saved; for the log)
};

}  // namespace

KEEL_PLUGIN(LrCooldown, "lr_cooldown", "1.0", keel::sdk::kSpikeHandler,
            "on a loss/grad-norm spike keeps the step but lowers the LR for a number of steps")
KEEL_PLUGIN_WARM_START(LrCooldown)

// Why: a reproducible loss spike in a real run: multiplies the LR by `factor` (default 300) at step `at_step`
// (default 12). The next step's loss jumps; spike handlers are tested against it. With `once` (default true)
// it fires only the first time it reaches that step, like a transient fault: its memory is plugin state, which
// a rollback does not undo, so a replay after a rollback is clean.
#include "keel/plugin.h"

namespace {

class LrSpike : public keel::sdk::Plugin {
 public:
  explicit LrSpike(const keel::sdk::Args& args)
      : at_step_(keel::sdk::arg_int(args, "at_step", 12)),
        factor_(keel::sdk::arg_double(args, "factor", 300.0)),
        once_(keel::sdk::arg_bool(args, "once", true)) {
    keel::sdk::require_known_args(args, {"at_step", "factor", "once"});
  }
  double learning_rate(const keel::sdk::StepContext& ctx, double base_lr) override {
    if (ctx.step != at_step_ || (once_ && fired_)) return base_lr;
    fired_ = true;
    return base_lr * factor_;
  }
  keel::sdk::PluginState save_state() const override { return {fired_ ? "{\"fired\": 1}" : "{\"fired\": 0}", {}}; }
  void load_state(const keel::sdk::PluginState& s) override { fired_ = keel::sdk::json_int(s.json, "fired", 0) != 0; }

 private:
  int64_t at_step_;
  double factor_;
  bool once_;
  bool fired_ = false;
};

}  // namespace

KEEL_PLUGIN(LrSpike, "lr_spike", "1.0", keel::sdk::kLrSchedule, "test fixture: LR x factor at one step")

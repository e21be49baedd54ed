// Why: a spike handler that returns a bad value on purpose: at step `at_step` (default 5) it decides
// `action` (continue | skip) with `lr_factor` (default nan) for `lr_factor_steps` (default 3) steps, or with
// `skip_data` if given. Keel must refuse the value at the hook boundary, naming the plugin, the hook and the value,
// before it reaches the weights.
#include <cmath>
#include <string>

#include "keel/plugin.h"

namespace {

class BadDecision : public keel::sdk::Plugin {
 public:
  explicit BadDecision(const keel::sdk::Args& args)
      : at_step_(keel::sdk::arg_int(args, "at_step", 5)),
        lr_factor_(keel::sdk::arg_double(args, "lr_factor", std::nan(""))),
        lr_factor_steps_(keel::sdk::arg_int(args, "lr_factor_steps", 3)),
        skip_(keel::sdk::arg_string(args, "action", "continue") == "skip"),
        skip_data_(keel::sdk::arg_string(args, "skip_data", "")) {
    keel::sdk::require_known_args(args, {"at_step", "lr_factor", "lr_factor_steps", "action", "skip_data"});
  }
  keel::sdk::Decision decide(const keel::sdk::StepContext& ctx) override {
    keel::sdk::Decision d;
    if (ctx.step != at_step_) return d;
    if (skip_) d = keel::sdk::Decision::skip_update("bad_decision fixture");
    d.lr_factor = lr_factor_;
    d.lr_factor_steps = lr_factor_steps_;
    d.skip_data = skip_data_;
    return d;
  }

 private:
  int64_t at_step_;
  double lr_factor_;
  int64_t lr_factor_steps_;
  bool skip_;
  std::string skip_data_;
};

}  // namespace

KEEL_PLUGIN(BadDecision, "bad_decision", "1.0", keel::sdk::kSpikeHandler, "test fixture: a decision out of range")

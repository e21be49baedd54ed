// Why: a gradient transform that writes NaN into every gradient at step `at_step` (default 3), after Keel's
// non-finite check: the optimizer then makes the weights NaN. Keel must notice at the next step and stop the
// run naming the tensor and the plugins that could have done it, instead of skipping every later step.
#include <ATen/ATen.h>

#include <cmath>

#include "keel/plugin.h"

namespace {

class PoisonGrads : public keel::sdk::Plugin {
 public:
  explicit PoisonGrads(const keel::sdk::Args& args) : at_step_(keel::sdk::arg_int(args, "at_step", 3)) {
    keel::sdk::require_known_args(args, {"at_step"});
  }
  void transform_grads(const keel::sdk::StepContext& ctx, std::vector<keel::sdk::Param>& params) override {
    if (ctx.step != at_step_) return;
    for (auto& p : params) {
      if (p.param.grad().defined()) p.param.mutable_grad().fill_(std::nan(""));
    }
  }

 private:
  int64_t at_step_;
};

}  // namespace

KEEL_PLUGIN(PoisonGrads, "poison_grads", "1.0", keel::sdk::kGradTransform,
            "test fixture: NaN gradients after the check")

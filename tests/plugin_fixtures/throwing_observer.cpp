// Why: an observer that throws from on_step_end at step `at_step` (default 4), i.e. after that step's update:
// Keel must stop the run with a checkpoint of the state after that step, a non-zero exit and the plugin named.
#include <stdexcept>

#include "keel/plugin.h"

namespace {

class ThrowingObserver : public keel::sdk::Plugin {
 public:
  explicit ThrowingObserver(const keel::sdk::Args& args) : at_step_(keel::sdk::arg_int(args, "at_step", 4)) {
    keel::sdk::require_known_args(args, {"at_step"});
  }
  void on_step_end(const keel::sdk::StepContext& ctx) override {
    if (ctx.step == at_step_) throw std::runtime_error("throwing_observer fixture: failing on purpose");
  }

 private:
  int64_t at_step_;
};

}  // namespace

KEEL_PLUGIN(ThrowingObserver, "throwing_observer", "1.0", keel::sdk::kObserver, "test fixture: throws after an update")

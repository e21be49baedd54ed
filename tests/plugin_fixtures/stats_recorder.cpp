// Why: the on_stats hook is the observer's view of the instability precursors. This observer records what it is
// given, so a test can check that the hook runs on stats steps only, after on_step_end, and sees the same values
// metrics.h5 stores: per statistic its first value as the metric "<name>0", its element count as "<name>_n", and
// "order" = 1 when on_step_end of the same step ran before it.
#include <string>

#include "keel/plugin.h"

namespace {

class StatsRecorder : public keel::sdk::Plugin {
 public:
  explicit StatsRecorder(const keel::sdk::Args& args) { keel::sdk::require_known_args(args, {}); }
  void on_step_end(const keel::sdk::StepContext& ctx) override { last_step_end_ = ctx.step; }
  void on_stats(const keel::sdk::StepContext& ctx) override {
    ctx.metric("order", last_step_end_ == ctx.step ? 1.0 : 0.0);
    for (const auto& [name, tensor] : ctx.activation_stats) {
      ctx.metric(name + "0", tensor.reshape({-1})[0].item<double>());
      ctx.metric(name + "_n", static_cast<double>(tensor.numel()));
    }
  }

 private:
  int64_t last_step_end_ = -1;
};

}  // namespace

KEEL_PLUGIN(StatsRecorder, "stats_recorder", "1.0", keel::sdk::kObserver, "test fixture: records what on_stats sees")

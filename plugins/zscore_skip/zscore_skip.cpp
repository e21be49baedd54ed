// Why: the cheapest answer to a loss spike, as in llm.c and OLMo-core: do not apply the update of a step whose
// loss or gradient norm is far outside its recent history, and train on. Detection (plugins/common/
// spike_window.h): a z-score above `threshold` against a rolling window of the last `window` non-spike steps,
// once `min_history` values are in it; a non-finite loss or grad norm is always a spike. The skipped step does
// not enter the window. The window is part of the plugin's checkpoint state, so a resumed run decides as the
// uninterrupted one would; added at a resume or swap without saved state, it warm starts from the run's recorded
// history (plugins/common/warm_start.h), so it is not blind for its first `min_history` steps.
// Arguments: window (50), min_history (10), threshold (6.0).
#include <ATen/ATen.h>

#include <string>

#include "../common/spike_window.h"
#include "../common/warm_start.h"
#include "keel/plugin.h"

namespace {

class ZScoreSkip : public keel::sdk::Plugin {
 public:
  explicit ZScoreSkip(const keel::sdk::Args& args) : detector_(checked_options(args)) {}

  keel::sdk::Decision decide(const keel::sdk::StepContext& ctx) override {
    const auto spike = detector_.observe(ctx);
    if (!spike) return {};
    ++skipped_;
    return keel::sdk::Decision::skip_update("step " + std::to_string(ctx.step) + ": " + spike->reason);
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json = "{\"skipped\": " + std::to_string(skipped_) + "}";
    detector_.save(state);
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    skipped_ = keel::sdk::json_int(state.json, "skipped", 0);
    detector_.load(state);
  }

  // Keel's warm-start hook (KEEL_PLUGIN_WARM_START below): a start without saved state on a resumed or branched
  // run replays the run's recorded history through the detector.
  keel::sdk::WarmStartResult warm_start(const keel::sdk::WarmStartHistory& history) {
    return keel::plugins::warm_start_detector(detector_, history);
  }

 private:
  static keel::plugins::SpikeDetectorOptions checked_options(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"window", "min_history", "threshold"});
    return keel::plugins::spike_detector_options(args, "zscore_skip");
  }

  keel::plugins::SpikeDetector detector_;
  int64_t skipped_ = 0;  // steps skipped so far (saved; for the log)
};

}  // namespace

KEEL_PLUGIN(ZScoreSkip, "zscore_skip", "1.0", keel::sdk::kSpikeHandler,
            "skips the update of a step whose loss or grad norm z-score exceeds a threshold")
KEEL_PLUGIN_WARM_START(ZScoreSkip)

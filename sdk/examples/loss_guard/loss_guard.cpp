// A spike handler in 25 lines: skip the update when the loss exceeds `max_loss` (default 10), and log how far
// below the limit each step stayed. Build: see CMakeLists.txt next to this file; load:
//   keel train ... --plugin spike_handler=/path/to/keel_plugin_loss_guard.so --plugin-arg loss_guard.max_loss=8
#include <keel/plugin.h>

class LossGuard : public keel::sdk::Plugin {
 public:
  explicit LossGuard(const keel::sdk::Args& args) : max_loss_(keel::sdk::arg_double(args, "max_loss", 10.0)) {
    keel::sdk::require_known_args(args, {"max_loss"});
  }
  keel::sdk::Decision decide(const keel::sdk::StepContext& ctx) override {
    ctx.metric("headroom", max_loss_ - ctx.loss);
    if (ctx.loss <= max_loss_) return {};
    ++skipped_;
    return keel::sdk::Decision::skip_update("loss " + std::to_string(ctx.loss) + " > " + std::to_string(max_loss_));
  }
  keel::sdk::PluginState save_state() const override { return {"{\"skipped\": " + std::to_string(skipped_) + "}", {}}; }
  void load_state(const keel::sdk::PluginState& s) override { skipped_ = keel::sdk::json_int(s.json, "skipped", 0); }

 private:
  double max_loss_;
  int64_t skipped_ = 0;
};

KEEL_PLUGIN(LossGuard, "loss_guard", "1.0", keel::sdk::kSpikeHandler, "skips updates whose loss exceeds max_loss")

// Why: global-norm clipping lets one tensor's huge gradient shrink every other tensor's step, and lets a
// tensor whose gradient is locally huge through when the global norm is still small. Adafactor and StableAdamW
// clip per tensor instead, on the RMS of the *update*; a grad_transform runs before the optimizer and never sees
// its update, so this plugin does the well-defined per-tensor part of it on the gradient:
//   for each param with a gradient g of n elements:  rms = sqrt(sum(g^2) / n)  (computed in float64)
//   if rms > max_rms:  g *= max_rms / rms           (so that RMS(g) = max_rms afterwards; direction kept)
// Tensors at or below max_rms, and tensors whose rms is not finite (Keel's own non-finite check handles those),
// are left bitwise unchanged. Emits the metric "clipped_tensors" (how many tensors were scaled this step).
// Under tensor parallelism each rank sees its shard, so the RMS is the shard's: with model.tp > 1 the clipping
// is per shard, not per full tensor.
// Arguments: max_rms (1.0, finite and > 0).
#include <ATen/ATen.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "keel/plugin.h"

namespace {

class UpdateClip : public keel::sdk::Plugin {
 public:
  explicit UpdateClip(const keel::sdk::Args& args) : max_rms_(parse_max_rms(args)) {}

  void transform_grads(const keel::sdk::StepContext& ctx, std::vector<keel::sdk::Param>& params) override {
    int64_t clipped = 0;
    for (auto& p : params) {
      at::Tensor& grad = p.param.mutable_grad();
      if (!grad.defined() || grad.numel() == 0) continue;
      const double rms = std::sqrt(grad.to(at::kDouble).square().mean().item<double>());
      if (!std::isfinite(rms) || rms <= max_rms_) continue;
      grad.mul_(max_rms_ / rms);
      ++clipped;
    }
    ctx.metric("clipped_tensors", static_cast<double>(clipped));
  }

 private:
  static double parse_max_rms(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"max_rms"});
    const double max_rms = keel::sdk::arg_double(args, "max_rms", 1.0);
    if (!(max_rms > 0) || !std::isfinite(max_rms)) {
      throw std::invalid_argument("update_clip: argument 'max_rms' must be a finite number > 0, got " +
                                  args.at("max_rms"));
    }
    return max_rms;
  }

  double max_rms_;
};

}  // namespace

KEEL_PLUGIN(UpdateClip, "update_clip", "1.0", keel::sdk::kGradTransform,
            "per-tensor gradient RMS clipping: scales each gradient whose RMS exceeds max_rms down to max_rms")

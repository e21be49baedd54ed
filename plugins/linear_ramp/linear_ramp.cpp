// Why: a step change of the data mix (static, staged) shifts the loss abruptly; a ramp moves from one mix to
// another gradually, the way annealing-phase data mixes are introduced. Exactly: `from` and `to` are each
// normalized to sum 1 (a source named in only one of them has weight 0 in the other); with
// x = (step - start_step) / (end_step - start_step) clamped to [0, 1], each source's weight is
//   w = round4(from_w + (to_w - from_w) * x)        round4(v) = std::round(v * 1e4) / 1e4
// so `from` (normalized) is returned up to start_step, `to` (normalized) from end_step on, and the mixture text
// changes at most when some weight crosses a multiple of 1e-4 (Keel records every change in the data ledger, so
// a ramp must not change it at every step for nothing). Names are listed in the order of `from`, then the new
// names of `to`. mixture_at throws if a name is not one of the run's sources.
// Arguments: from, to (required; NAME=WEIGHT,...), start_step (0, >= 0), end_step (required, > start_step).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "../common/mixture_weights.h"
#include "keel/plugin.h"

namespace {

class LinearRamp : public keel::sdk::Plugin {
 public:
  explicit LinearRamp(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"from", "to", "start_step", "end_step"});
    const std::string from_text = keel::plugins::required_arg(args, "from", "linear_ramp");
    const std::string to_text = keel::plugins::required_arg(args, "to", "linear_ramp");
    from_arg_ = keel::plugins::parse_weights(from_text, "linear_ramp", "from", from_text);
    to_arg_ = keel::plugins::parse_weights(to_text, "linear_ramp", "to", to_text);
    keel::plugins::required_arg(args, "end_step", "linear_ramp");
    start_step_ = keel::sdk::arg_int(args, "start_step", 0);
    end_step_ = keel::sdk::arg_int(args, "end_step", 0);
    if (start_step_ < 0) {
      throw std::invalid_argument("linear_ramp: argument 'start_step' must be >= 0, got " +
                                  std::to_string(start_step_));
    }
    if (end_step_ <= start_step_) {
      throw std::invalid_argument("linear_ramp: argument 'end_step' (" + std::to_string(end_step_) +
                                  ") must be > start_step (" + std::to_string(start_step_) + ")");
    }
    // Both mixtures over the union of names, normalized.
    for (const auto& [name, w] : from_arg_) names_.push_back(name);
    for (const auto& [name, w] : to_arg_) {
      if (std::find(names_.begin(), names_.end(), name) == names_.end()) names_.push_back(name);
    }
    from_ = normalized(from_arg_, names_);
    to_ = normalized(to_arg_, names_);
  }

  std::string mixture_at(int64_t step, const std::vector<std::string>& sources) override {
    keel::plugins::require_known_sources(from_arg_, sources, "linear_ramp", "from");
    keel::plugins::require_known_sources(to_arg_, sources, "linear_ramp", "to");
    const double x =
        std::clamp(static_cast<double>(step - start_step_) / static_cast<double>(end_step_ - start_step_), 0.0, 1.0);
    keel::plugins::Weights weights;
    for (size_t i = 0; i < names_.size(); ++i) {
      const double w = x >= 1.0 ? to_[i] : from_[i] + (to_[i] - from_[i]) * x;
      weights.emplace_back(names_[i], std::round(w * 1e4) / 1e4 + 0.0);
    }
    return keel::plugins::format_weights(weights);
  }

 private:
  // The weights of `names` (0 for a name not in `weights`), divided by their sum.
  static std::vector<double> normalized(const keel::plugins::Weights& weights, const std::vector<std::string>& names) {
    double sum = 0.0;
    for (const auto& [name, w] : weights) sum += w;
    std::vector<double> out(names.size(), 0.0);
    for (const auto& [name, w] : weights) {
      out[std::find(names.begin(), names.end(), name) - names.begin()] = w / sum;
    }
    return out;
  }

  keel::plugins::Weights from_arg_, to_arg_;  // as written (checked against the run's sources)
  int64_t start_step_ = 0, end_step_ = 0;
  std::vector<std::string> names_;  // from's names, then to's new ones
  std::vector<double> from_, to_;   // per name, normalized to sum 1
};

}  // namespace

KEEL_PLUGIN(LinearRamp, "linear_ramp", "1.0", keel::sdk::kDataMixture,
            "moves the data mixture linearly from one set of weights to another between two steps")

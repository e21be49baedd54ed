// Why: the simplest data_mixture plugin: one fixed mixture for the whole run, given on the command line
// (--plugin data_mixture=static --plugin-arg static.weights=prose=0.3,code=0.7). Its use is a branch from a
// checkpoint that trains on with another mix than the parent run, recorded in the data ledger like any change.
// mixture_at(step) returns the weights for every step, as canonical text ("prose=0.3,code=0.7": names in the
// order written, shortest exact numbers, not normalized — Keel normalizes), and throws if a name is not one of
// the run's sources.
// Arguments: weights (required; NAME=WEIGHT,... with finite weights >= 0 summing to > 0).
#include <ATen/ATen.h>

#include <string>

#include "../common/mixture_weights.h"
#include "keel/plugin.h"

namespace {

class StaticMixture : public keel::sdk::Plugin {
 public:
  explicit StaticMixture(const keel::sdk::Args& args) : weights_(parse(args)) {}

  std::string mixture_at(int64_t /*step*/, const std::vector<std::string>& sources) override {
    keel::plugins::require_known_sources(weights_, sources, "static", "weights");
    return keel::plugins::format_weights(weights_);
  }

 private:
  static keel::plugins::Weights parse(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"weights"});
    const std::string text = keel::plugins::required_arg(args, "weights", "static");
    return keel::plugins::parse_weights(text, "static", "weights", text);
  }

  keel::plugins::Weights weights_;
};

}  // namespace

KEEL_PLUGIN(StaticMixture, "static", "1.0", keel::sdk::kDataMixture, "one fixed data mixture for every step")

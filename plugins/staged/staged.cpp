// Why: CrystalCoder (LLM360) was trained in three stages with a rising share of code; this plugin expresses such
// a curriculum as a plugin, so it can be attached to a run (or a branch) without editing data.schedule:
//   stages = "0:prose=0.7,code=0.3;1000:prose=0.4,code=0.6;2000:prose=0.1,code=0.9"
// mixture_at(step) returns the weights of the stage with the largest start step <= step (canonical text, as
// static), or "" (no change: data.mixture applies) before the first stage. Stages may be written in any order;
// their start steps must differ.
// Arguments: stages (required; STEP:NAME=WEIGHT,...;STEP:...).
#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>

#include "../common/mixture_weights.h"
#include "keel/plugin.h"

namespace {

class StagedMixture : public keel::sdk::Plugin {
 public:
  explicit StagedMixture(const keel::sdk::Args& args) : stages_(parse(args)) {}

  std::string mixture_at(int64_t step, const std::vector<std::string>& sources) override {
    for (const auto& stage : stages_) keel::plugins::require_known_sources(stage.second, sources, "staged", "stages");
    const Stage* active = nullptr;
    for (const auto& stage : stages_) {
      if (stage.first <= step) active = &stage;
    }
    return active ? keel::plugins::format_weights(active->second) : std::string();
  }

 private:
  using Stage = std::pair<int64_t, keel::plugins::Weights>;  // start step, weights

  static std::vector<Stage> parse(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"stages"});
    const std::string text = keel::plugins::required_arg(args, "stages", "staged");
    std::vector<Stage> stages;
    for (const auto& item : keel::plugins::split(text, ';')) {
      if (item.empty()) continue;  // a trailing ';'
      const size_t colon = item.find(':');
      if (colon == std::string::npos) {
        throw keel::plugins::bad_arg("staged", "stages", text, "expected STEP:name=weight,..., got '" + item + "'");
      }
      Stage stage{keel::plugins::parse_step(item.substr(0, colon), "staged", "stages", text),
                  keel::plugins::parse_weights(item.substr(colon + 1), "staged", "stages", text)};
      for (const auto& s : stages) {
        if (s.first == stage.first) {
          throw keel::plugins::bad_arg("staged", "stages", text,
                                       "two stages start at step " + std::to_string(stage.first));
        }
      }
      stages.push_back(std::move(stage));
    }
    if (stages.empty()) throw keel::plugins::bad_arg("staged", "stages", text, "no stage");
    std::sort(stages.begin(), stages.end(), [](const Stage& a, const Stage& b) { return a.first < b.first; });
    return stages;
  }

  std::vector<Stage> stages_;  // sorted by start step
};

}  // namespace

KEEL_PLUGIN(StagedMixture, "staged", "1.0", keel::sdk::kDataMixture,
            "data mixture in stages (CrystalCoder): STEP:weights;STEP:weights;...")

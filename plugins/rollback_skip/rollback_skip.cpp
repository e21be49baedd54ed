// Why: the intervention the PaLM, OPT and K2-65B teams used by hand for the spikes that skipping alone does not
// cure: go back to a checkpoint before the spike and train forward again without the data that preceded it,
// optionally with fresh optimizer moments and a lower LR for a while. Detection is shared with zscore_skip
// (plugins/common/spike_window.h). On a spike this handler returns Action::kRollback with
//   skip_data: the offending global batch (ctx.batch) as skip rules (docs/data.md). skip=chunk (default): its
//              distinct (source, chunk) pairs, sorted by source then chunk, "code:chunk:7;prose:chunk:1;...";
//              skip=samples: its distinct sample ids per source, sorted, consecutive ids merged into one range,
//              "code:samples:100;prose:samples:5-6;...". Skip rules act in every epoch, and Keel keeps them across
//              later rollbacks and resumes (docs/data.md), so a second rollback skips a new batch.
//   reset_optimizer_moments = reset_moments, lr_factor = lr_factor for lr_factor_steps steps.
// After max_rollbacks rollbacks (counted when asked for; saved in the plugin state) a further spike only skips
// the update (Decision::skip_update), so a spike that replaying does not cure cannot loop forever.
// Arguments: window (50), min_history (10), threshold (6.0), skip (chunk|samples), reset_moments (false),
// lr_factor (0.5, in (0, 1]), lr_factor_steps (100, >= 0), max_rollbacks (3, >= 0).
#include <ATen/ATen.h>

#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include "../common/spike_window.h"
#include "keel/plugin.h"

namespace {

class RollbackSkip : public keel::sdk::Plugin {
 public:
  explicit RollbackSkip(const keel::sdk::Args& args)
      : detector_(checked_options(args)),
        skip_(keel::sdk::arg_string(args, "skip", "chunk")),
        reset_moments_(keel::sdk::arg_bool(args, "reset_moments", false)),
        lr_factor_(keel::sdk::arg_double(args, "lr_factor", 0.5)),
        lr_factor_steps_(keel::sdk::arg_int(args, "lr_factor_steps", 100)),
        max_rollbacks_(keel::sdk::arg_int(args, "max_rollbacks", 3)) {
    if (skip_ != "chunk" && skip_ != "samples") {
      throw std::invalid_argument("rollback_skip: argument 'skip' must be 'chunk' or 'samples', got '" + skip_ + "'");
    }
    if (!(lr_factor_ > 0 && lr_factor_ <= 1)) {
      throw std::invalid_argument("rollback_skip: argument 'lr_factor' must be in (0, 1], got " +
                                  keel::plugins::short_number(lr_factor_));
    }
    if (lr_factor_steps_ < 0) {
      throw std::invalid_argument("rollback_skip: argument 'lr_factor_steps' must be >= 0, got " +
                                  std::to_string(lr_factor_steps_));
    }
    if (max_rollbacks_ < 0) {
      throw std::invalid_argument("rollback_skip: argument 'max_rollbacks' must be >= 0, got " +
                                  std::to_string(max_rollbacks_));
    }
  }

  keel::sdk::Decision decide(const keel::sdk::StepContext& ctx) override {
    const auto spike = detector_.observe(ctx);
    if (!spike) return {};
    const std::string what = "step " + std::to_string(ctx.step) + ": " + spike->reason;
    if (rollbacks_ >= max_rollbacks_) {
      return keel::sdk::Decision::skip_update(what + "; max_rollbacks = " + std::to_string(max_rollbacks_) +
                                              " reached, skipping the update instead of rolling back");
    }
    ++rollbacks_;
    keel::sdk::Decision d;
    d.action = keel::sdk::Decision::Action::kRollback;
    d.skip_data = skip_ == "chunk" ? chunk_rules(ctx.batch) : sample_rules(ctx.batch);
    d.reset_optimizer_moments = reset_moments_;
    d.lr_factor = lr_factor_;
    d.lr_factor_steps = lr_factor_steps_;
    d.reason = what + "; rollback " + std::to_string(rollbacks_) + " of at most " + std::to_string(max_rollbacks_) +
               ", skipping " + (d.skip_data.empty() ? std::string("no data (empty batch)") : d.skip_data);
    return d;
  }

  void on_rollback(int64_t to_step) override { last_rollback_to_step_ = to_step; }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json = "{\"rollbacks\": " + std::to_string(rollbacks_) +
                 ", \"last_rollback_to_step\": " + std::to_string(last_rollback_to_step_) + "}";
    detector_.save(state);
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    rollbacks_ = keel::sdk::json_int(state.json, "rollbacks", 0);
    last_rollback_to_step_ = keel::sdk::json_int(state.json, "last_rollback_to_step", -1);
    detector_.load(state);
  }

 private:
  static keel::plugins::SpikeDetectorOptions checked_options(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"window", "min_history", "threshold", "skip", "reset_moments", "lr_factor",
                                         "lr_factor_steps", "max_rollbacks"});
    return keel::plugins::spike_detector_options(args, "rollback_skip");
  }

  // "code:chunk:7;prose:chunk:1;prose:chunk:3": the batch's distinct (source, chunk) pairs, sorted.
  static std::string chunk_rules(const std::vector<keel::sdk::SampleInfo>& batch) {
    std::set<std::pair<std::string, int64_t>> chunks;
    for (const auto& s : batch) chunks.emplace(s.source, s.chunk);
    std::string rules;
    for (const auto& [source, chunk] : chunks) {
      rules += (rules.empty() ? "" : ";") + source + ":chunk:" + std::to_string(chunk);
    }
    return rules;
  }

  // "code:samples:100;prose:samples:5-6;prose:samples:9": distinct sample ids per source, sorted, runs merged.
  static std::string sample_rules(const std::vector<keel::sdk::SampleInfo>& batch) {
    std::map<std::string, std::set<int64_t>> ids;
    for (const auto& s : batch) ids[s.source].insert(s.sample_id);
    std::string rules;
    const auto add = [&rules](const std::string& source, int64_t first, int64_t last) {
      rules += (rules.empty() ? "" : ";") + source + ":samples:" + std::to_string(first) +
               (last != first ? "-" + std::to_string(last) : std::string());
    };
    for (const auto& [source, sorted] : ids) {
      int64_t first = *sorted.begin(), last = first;
      for (const int64_t id : sorted) {
        if (id > last + 1) {
          add(source, first, last);
          first = id;
        }
        last = id;
      }
      add(source, first, last);
    }
    return rules;
  }

  keel::plugins::SpikeDetector detector_;
  std::string skip_;
  bool reset_moments_;
  double lr_factor_;
  int64_t lr_factor_steps_;
  int64_t max_rollbacks_;
  int64_t rollbacks_ = 0;               // rollbacks asked for so far (saved)
  int64_t last_rollback_to_step_ = -1;  // the step Keel last rolled back to (saved; -1 = none)
};

}  // namespace

KEEL_PLUGIN(RollbackSkip, "rollback_skip", "1.0", keel::sdk::kSpikeHandler,
            "on a loss/grad-norm spike rolls back to a checkpoint and skips the offending batch's data")

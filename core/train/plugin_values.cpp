// Why: see plugin_values.h.
#include "core/train/plugin_values.h"

#include <cmath>
#include <sstream>

#include "core/data/mixture.h"
#include "core/plugin_host/plugin_library.h"

namespace keel::train {
namespace {

std::string number(double value) {
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

[[noreturn]] void refuse(const std::string& plugin, const char* hook, int64_t step, const std::string& what) {
  throw plugin_host::PluginError("plugin " + plugin + " returned " + what + " from " + hook + " at step " +
                                 std::to_string(step) + "; the run stops before the value reaches the weights");
}

}  // namespace

void check_learning_rate(double lr, const std::string& plugin, int64_t step) {
  if (!std::isfinite(lr) || lr < 0.0)
    refuse(plugin, "learning_rate()", step, "learning rate " + number(lr) + " (must be finite and >= 0)");
}

void check_decision(const sdk::Decision& d, const std::string& plugin, int64_t step,
                    const std::vector<std::string>& sources) {
  const int action = static_cast<int>(d.action);
  if (action < 0 || action > static_cast<int>(sdk::Decision::Action::kStop))
    refuse(plugin, "decide()", step, "unknown action " + std::to_string(action));
  if (!std::isfinite(d.lr_factor) || d.lr_factor <= 0.0)
    refuse(plugin, "decide()", step, "lr_factor " + number(d.lr_factor) + " (must be finite and > 0)");
  if (d.lr_factor_steps < 0)
    refuse(plugin, "decide()", step, "lr_factor_steps " + std::to_string(d.lr_factor_steps) + " (must be >= 0)");
  if (!d.skip_data.empty()) {
    try {
      data::parse_skip(d.skip_data, sources, step, "skip_data");
    } catch (const std::exception& e) {
      refuse(plugin, "decide()", step, "unusable skip_data: " + std::string(e.what()));
    }
  }
}

void check_mixture(const std::string& weights, const std::string& plugin, int64_t step,
                   const std::vector<std::string>& sources) {
  if (weights.empty()) return;
  try {
    data::parse_weights(weights, sources, "mixture");
  } catch (const std::exception& e) {
    refuse(plugin, "mixture_at()", step, "unusable weights: " + std::string(e.what()));
  }
}

}  // namespace keel::train

// Why: the μP factors of parametrization.h, computed in one place from the model config.
#include "core/model/parametrization.h"

#include <cmath>

namespace keel::model {

double mup_width_ratio(const ModelConfig& config) {
  if (config.parametrization != Parametrization::kMup || config.mup_base_d_model <= 0) return 1.0;
  return static_cast<double>(config.d_model) / static_cast<double>(config.mup_base_d_model);
}

bool is_hidden_matrix(const std::string& name, int64_t dim) { return dim >= 2 && name.rfind("blocks.", 0) == 0; }

double mup_lr_scale(const ModelConfig& config, const std::string& name, int64_t dim) {
  return is_hidden_matrix(name, dim) ? 1.0 / mup_width_ratio(config) : 1.0;
}

double mup_init_scale(const ModelConfig& config, const std::string& name, int64_t dim) {
  return is_hidden_matrix(name, dim) ? 1.0 / std::sqrt(mup_width_ratio(config)) : 1.0;
}

double mup_output_multiplier(const ModelConfig& config) { return 1.0 / mup_width_ratio(config); }

double mup_query_multiplier(const ModelConfig& config) {
  const double ratio = mup_width_ratio(config);
  if (ratio == 1.0) return 1.0;
  const double base_head_dim = static_cast<double>(config.mup_base_d_model) / static_cast<double>(config.heads);
  return std::sqrt(base_head_dim / static_cast<double>(config.head_dim()));
}

}  // namespace keel::model

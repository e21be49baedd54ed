// Why: see sharded_module.h.
#include "core/model/sharded_module.h"

#include <stdexcept>

namespace keel::model {

const ParameterSpec& ShardedModule::parameter_spec(const std::string& name) const {
  const auto it = specs_.find(name);
  if (it == specs_.end())
    throw std::out_of_range(this->name() + ": parameter '" + name + "' was registered without a ParameterSpec");
  return it->second;
}

torch::Tensor& ShardedModule::declare_parameter(const std::string& name, torch::Tensor tensor, ParameterSpec spec) {
  specs_[name] = spec;
  return register_parameter(name, std::move(tensor));
}

}  // namespace keel::model

// Why: the model is Megatron-style: each layer knows how its own parameters are split over the tensor-parallel
// group and how they are initialised, and says so when it registers them. ShardedModule is that declaration:
// a layer derives from it and registers each parameter through declare_parameter instead of register_parameter;
// parameter_specs() (sharding.h) then asks every module, with no knowledge of layer types or parameter names.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>

#include "core/model/sharding.h"

namespace keel::model {

class ShardedModule : public torch::nn::Module {
 public:
  // The spec declared for this module's own parameter `name` (its local name, e.g. "weight").
  // std::out_of_range naming the parameter when it was registered without a declaration.
  const ParameterSpec& parameter_spec(const std::string& name) const;

 protected:
  // register_parameter plus the declaration; returns the registered tensor.
  torch::Tensor& declare_parameter(const std::string& name, torch::Tensor tensor, ParameterSpec spec);

 private:
  std::map<std::string, ParameterSpec> specs_;
};

}  // namespace keel::model

// Why: see sharding.h.
#include "core/model/sharding.h"

#include <torch/torch.h>

#include <map>

#include "core/model/sharded_module.h"

namespace keel::model {

std::vector<std::pair<std::string, ParameterSpec>> parameter_specs(const torch::nn::Module& module) {
  // Each module answers for its own (non-recursive) parameters; the full name is its path plus the local name.
  std::map<std::string, ParameterSpec> declared;
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    const auto* sharded = dynamic_cast<const ShardedModule*>(item.value().get());
    if (sharded == nullptr) continue;
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : sharded->named_parameters(/*recurse=*/false))
      declared[prefix + p.key()] = sharded->parameter_spec(p.key());
  }
  std::vector<std::pair<std::string, ParameterSpec>> specs;
  for (const auto& item : module.named_parameters()) {
    const auto it = declared.find(item.key());
    specs.emplace_back(item.key(), it == declared.end() ? ParameterSpec{} : it->second);
  }
  return specs;
}

std::vector<std::pair<std::string, ShardSpec>> shard_specs(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, ShardSpec>> specs;
  for (const auto& [name, spec] : parameter_specs(module)) specs.emplace_back(name, spec.shard);
  return specs;
}

std::vector<int64_t> global_shape(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_size) {
  std::vector<int64_t> shape(local_sizes.begin(), local_sizes.end());
  if (spec.sharded()) shape.at(spec.dim) *= tp_size;
  return shape;
}

std::vector<int64_t> shard_offset(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_rank) {
  std::vector<int64_t> offset(local_sizes.size(), 0);
  if (spec.sharded()) offset.at(spec.dim) = local_sizes[spec.dim] * tp_rank;
  return offset;
}

at::Tensor shard_of(const at::Tensor& full, const ShardSpec& spec, int64_t tp_rank, int64_t tp_size) {
  if (!spec.sharded() || tp_size == 1) return full;
  const int64_t size = full.size(spec.dim);
  TORCH_CHECK(size % tp_size == 0, "dimension ", spec.dim, " of size ", size, " does not split over ", tp_size,
              " ranks");
  return full.narrow(spec.dim, tp_rank * (size / tp_size), size / tp_size);
}

}  // namespace keel::model

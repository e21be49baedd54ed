// Why: see sharding.h.
#include "core/model/sharding.h"

#include <torch/torch.h>

#include "core/model/llama.h"
#include "core/model/tp_layers.h"

namespace keel::model {

std::vector<std::pair<std::string, ShardSpec>> shard_specs(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, ShardSpec>> specs;
  for (const auto& item : module.named_parameters()) specs.emplace_back(item.key(), ShardSpec{});
  auto set = [&](const std::string& prefix, const ShardSpec& spec) {
    for (auto& [name, s] : specs) {
      if (name.compare(0, prefix.size(), prefix) == 0 && name.find('.', prefix.size()) == std::string::npos) s = spec;
    }
  };
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    const std::string prefix = item.key() + ".";
    const torch::nn::Module* m = item.value().get();
    if (dynamic_cast<const ColumnParallelLinearImpl*>(m))
      set(prefix, {0, false});
    else if (dynamic_cast<const VocabParallelEmbeddingImpl*>(m))
      set(prefix, {0, false});
    else if (dynamic_cast<const RowParallelLinearImpl*>(m))
      set(prefix, {1, false});
    else if (dynamic_cast<const NormImpl*>(m)) {
      const std::string& key = item.key();
      const bool qk = key.size() >= 6 &&
                      (key.compare(key.size() - 6, 6, "q_norm") == 0 || key.compare(key.size() - 6, 6, "k_norm") == 0);
      if (qk) set(prefix, {-1, true});
    }
  }
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

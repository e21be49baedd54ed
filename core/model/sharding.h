// Why: one answer to "how is this parameter split across the tensor-parallel group?", used by the weight init
// (every layout starts from the same full weights), the gradient norm (each shard counted once), and the
// checkpoint code (global shape and offset of each shard, resharding on resume). Torch-light.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}

namespace keel::model {

struct ShardSpec {
  int64_t dim = -1;                   // the dimension split over TP ranks; -1 = replicated on every TP rank
  bool grad_partial_over_tp = false;  // replicated, but each TP rank's gradient is a partial sum (QK-norm)
  bool sharded() const { return dim >= 0; }
};

// Every parameter of `module`, named as named_parameters() names them, with its split: column-parallel
// weights and the vocab-parallel embedding split dim 0, row-parallel weights dim 1, QK-norm weights are
// replicated with partial gradients, everything else replicated.
std::vector<std::pair<std::string, ShardSpec>> shard_specs(const torch::nn::Module& module);

// The shape of the full tensor a shard of `local_sizes` belongs to, and the shard's offset in it.
std::vector<int64_t> global_shape(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_size);
std::vector<int64_t> shard_offset(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_rank);
// The part of `full` that TP rank `tp_rank` of `tp_size` holds (a view).
at::Tensor shard_of(const at::Tensor& full, const ShardSpec& spec, int64_t tp_rank, int64_t tp_size);

}  // namespace keel::model

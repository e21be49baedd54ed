// Why: one answer to "how is this parameter split across the tensor-parallel group, and how is it initialised?",
// used by the weight init (every layout starts from the same full weights), the gradient norm (each shard counted
// once), and the checkpoint code (global shape and offset of each shard, resharding on resume). The answer is
// not guessed from types or names: each layer declares it for each parameter it registers (ShardedModule, in
// core/model/sharded_module.h), as Megatron-Core's layers mark their parameters. Torch-light.
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

// How a parameter's initial (full, unsharded) value is drawn.
enum class InitRole {
  kUndeclared,    // registered by a module that declares nothing (init_weights refuses it)
  kNormal,        // normal(0, model.init_std)
  kOutputNormal,  // normal(0, model.init_std / sqrt(2 * model.layers)): projections into the residual stream
  kOnes,          // norm weights
  kZeros,         // norm biases
};

struct ParameterSpec {
  ShardSpec shard;
  InitRole init = InitRole::kUndeclared;
};

// Every parameter of `module`, named as named_parameters() names them and in that order, with the spec its
// layer declared; a parameter of a module that declares none is replicated with InitRole::kUndeclared.
std::vector<std::pair<std::string, ParameterSpec>> parameter_specs(const torch::nn::Module& module);
// The same walk, keeping only each parameter's split.
std::vector<std::pair<std::string, ShardSpec>> shard_specs(const torch::nn::Module& module);

// The shape of the full tensor a shard of `local_sizes` belongs to, and the shard's offset in it.
std::vector<int64_t> global_shape(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_size);
std::vector<int64_t> shard_offset(at::IntArrayRef local_sizes, const ShardSpec& spec, int64_t tp_rank);
// The part of `full` that TP rank `tp_rank` of `tp_size` holds (a view).
at::Tensor shard_of(const at::Tensor& full, const ShardSpec& spec, int64_t tp_rank, int64_t tp_size);

}  // namespace keel::model

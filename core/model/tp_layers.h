// Why: Megatron-style tensor-parallel building blocks, written from day one so that the decoder never changes
// when tensor parallelism is switched on. Each layer owns only its shard of the full weight:
//   ColumnParallelLinear  weight [out/tp, in]   output stays sharded along the last dim
//   RowParallelLinear     weight [out, in/tp]   input sharded, output summed over the TP group
//   VocabParallelEmbedding weight [V/tp, C]     each rank looks up its vocabulary range
// With tp.size == 1 (the only layout until the parallelism issue adds the collectives) they are plain layers.
// Weights are fp32 master copies; `forward` casts them to the compute dtype (bf16 in bf16-mixed), so autograd
// returns fp32 gradients to the masters and accumulates them in fp32.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "core/parallel/tensor_parallel.h"

namespace keel::model {

class ColumnParallelLinearImpl : public torch::nn::Module {
 public:
  ColumnParallelLinearImpl(int64_t in_features, int64_t out_features, const parallel::TensorParallel& tp,
                           const std::string& what);
  // x: [..., in] (compute dtype) -> [..., out/tp]
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight;  // [out/tp, in] fp32
};
TORCH_MODULE(ColumnParallelLinear);

class RowParallelLinearImpl : public torch::nn::Module {
 public:
  RowParallelLinearImpl(int64_t in_features, int64_t out_features, const parallel::TensorParallel& tp,
                        const std::string& what);
  // x: [..., in/tp] (compute dtype) -> [..., out]
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight;  // [out, in/tp] fp32
};
TORCH_MODULE(RowParallelLinear);

class VocabParallelEmbeddingImpl : public torch::nn::Module {
 public:
  VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, const parallel::TensorParallel& tp);
  // tokens: [B, T] int64 -> [B, T, C] in `dtype`
  torch::Tensor forward(const torch::Tensor& tokens, torch::ScalarType dtype) const;
  torch::Tensor weight;  // [V/tp, C] fp32
};
TORCH_MODULE(VocabParallelEmbedding);

struct CrossEntropyParts {
  torch::Tensor loss;    // scalar fp32: mean token NLL + z-loss term (what is differentiated)
  torch::Tensor nll;     // scalar fp32: mean token NLL (what is reported as "loss")
  torch::Tensor z_loss;  // scalar fp32: z_loss_coef * mean (log Z)^2
};

// logits: [N, V/tp] (any float dtype; statistics in fp32), targets: [N] int64 -> mean losses.
CrossEntropyParts vocab_parallel_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                               double z_loss_coef, const parallel::TensorParallel& tp);

}  // namespace keel::model

// Why: Megatron-style tensor-parallel building blocks, so that the decoder is the same code at every TP size.
// Each layer owns only its shard of the full weight and declares that split (and the weight's init role) when it
// registers it (ShardedModule):
//   ColumnParallelLinear  weight [out/tp, in]   split dim 0; output stays sharded along the last dim
//   RowParallelLinear     weight [out, in/tp]   split dim 1; input sharded, output summed over the TP group
//   VocabParallelEmbedding weight [V/tp, C]     split dim 0; each rank looks up its vocabulary range
// The caller chooses the init role of a linear layer (kOutputNormal for projections into the residual stream).
// With tp.size == 1 they are plain layers and no communication happens. Under sequence parallelism (tp.sp()) a
// column-parallel layer and the tied head read an input the caller has already gathered over the sequence
// (gather_from_sequence_region, whose backward sums the gradient), a row-parallel layer and the embedding
// reduce-scatter their output over the sequence: [B, T/tp, C].
// Weights are fp32 master copies; `forward` casts them to the compute dtype (bf16 in bf16-mixed), so autograd
// returns fp32 gradients to the masters and accumulates them in fp32.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "core/model/sharded_module.h"
#include "core/parallel/tensor_parallel.h"

namespace keel::model {

class ColumnParallelLinearImpl : public ShardedModule {
 public:
  ColumnParallelLinearImpl(int64_t in_features, int64_t out_features, const parallel::TensorParallel& tp,
                           const std::string& what, InitRole init = InitRole::kNormal);
  // x: [..., in] (compute dtype, replicated over TP) -> [..., out/tp]
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight;  // [out/tp, in] fp32

 private:
  parallel::TensorParallel tp_;
};
TORCH_MODULE(ColumnParallelLinear);

class RowParallelLinearImpl : public ShardedModule {
 public:
  RowParallelLinearImpl(int64_t in_features, int64_t out_features, const parallel::TensorParallel& tp,
                        const std::string& what, InitRole init = InitRole::kNormal);
  // x: [..., in/tp] (compute dtype) -> [..., out], summed over TP (the same on every TP rank)
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight;  // [out, in/tp] fp32

 private:
  parallel::TensorParallel tp_;
};
TORCH_MODULE(RowParallelLinear);

class VocabParallelEmbeddingImpl : public ShardedModule {
 public:
  VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, const parallel::TensorParallel& tp);
  // tokens: [B, T] int64 (full vocabulary ids) -> [B, T, C] in `dtype`, the same on every TP rank
  torch::Tensor forward(const torch::Tensor& tokens, torch::ScalarType dtype) const;
  // The tied output head. x: [..., C] (compute dtype, replicated over TP) -> logits [..., V/tp] in x's dtype,
  // this rank's vocabulary range (what vocab_parallel_cross_entropy reads).
  torch::Tensor project(const torch::Tensor& x) const;
  int64_t vocab_start() const { return vocab_start_; }  // first vocabulary id this rank owns
  torch::Tensor weight;                                 // [V/tp, C] fp32

 private:
  parallel::TensorParallel tp_;
  int64_t vocab_start_ = 0;
};
TORCH_MODULE(VocabParallelEmbedding);

struct CrossEntropyParts {
  torch::Tensor loss;    // scalar fp32: mean token NLL + z-loss term (what is differentiated)
  torch::Tensor nll;     // scalar fp32: mean token NLL (what is reported as "loss")
  torch::Tensor z_loss;  // scalar fp32: z_loss_coef * mean (log Z)^2
  // [N] fp32, not differentiable: each row's (token's) NLL, 0 for an ignored target; nll is their mean over the
  // rows kept. What per-sample losses are made of (metrics /data/sample_loss), at no extra cost.
  torch::Tensor row_nll;
};

// logits: [N, V/tp] (any float dtype; statistics in fp32), rank r holding vocabulary columns
// [r*V/tp, (r+1)*V/tp); targets: [N] int64 full vocabulary ids -> mean losses, the same on every TP rank.
// With tp.size > 1 the softmax statistics are reduced over the TP group (max, then sum-exp and target logit)
// and the backward is explicit and local: d loss / d logits_ij = (softmax_ij * (1 + 2 coef logZ_i)
// - [j == target_i]) / N. The logits gradient comes back in the logits' dtype.
CrossEntropyParts vocab_parallel_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                               double z_loss_coef, const parallel::TensorParallel& tp);

}  // namespace keel::model

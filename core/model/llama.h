// Why: the LLaMA-family decoder (RMSNorm/LayerNorm, RoPE with optional partial rotary, GQA, SwiGLU, optional
// QK-norm, tied or untied embeddings, z-loss), written Megatron-style: it is built for one place in the parallel
// layout and knows it. It is given a TP handle (its tensor-parallel layers hold their shards and communicate over
// that group) and a StageSpec (which blocks, and whether the embedding and head, this pipeline stage holds), and
// each layer declares how its parameters split over TP and how they are initialised (ShardedModule). It knows
// nothing of pipeline schedules, micro-batches, data parallelism or the training loop. Fused-kernel choices are
// made in ops.h. Shapes: B batch, T time, C d_model, H heads, K kv heads, D head dim, F ffn hidden, V vocab.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/pimpl.h>

#include "core/config/config.h"
#include "core/model/ops.h"
#include "core/model/sharded_module.h"
#include "core/model/tp_layers.h"

namespace keel::model {

// Normalisation with fp32 statistics; weight (and bias for LayerNorm) fp32; output in the input dtype.
// Replicated over TP; weight initialised to ones, bias to zeros. `grad_partial_over_tp`: the norm sees only this
// rank's heads (QK-norm), so its gradient is a partial sum the trainer reduces over TP.
class NormImpl : public ShardedModule {
 public:
  NormImpl(int64_t dim, NormKind kind, double eps, bool grad_partial_over_tp = false);
  torch::Tensor forward(const torch::Tensor& x) const;  // [..., dim] -> [..., dim]
  torch::Tensor weight;                                 // [dim]
  torch::Tensor bias;                                   // [dim] (layernorm only)
 private:
  bool rms_;
  double eps_;
};
TORCH_MODULE(Norm);

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& config, const parallel::TensorParallel& tp);
  torch::Tensor forward(const torch::Tensor& x, const RotaryTables& rope) const;  // [B, T, C] -> [B, T, C]
 private:
  int64_t local_heads_, local_kv_heads_, head_dim_;
  double query_multiplier_;  // μP's attention scale on top of 1/sqrt(D) (parametrization.h); 1 otherwise
  ColumnParallelLinear wq_{nullptr}, wk_{nullptr}, wv_{nullptr};
  RowParallelLinear wo_{nullptr};
  Norm q_norm_{nullptr}, k_norm_{nullptr};
};
TORCH_MODULE(Attention);

class SwiGluMlpImpl : public torch::nn::Module {
 public:
  SwiGluMlpImpl(const ModelConfig& config, const parallel::TensorParallel& tp);
  torch::Tensor forward(const torch::Tensor& x) const;  // [B, T, C] -> [B, T, C]
 private:
  ColumnParallelLinear w_gate_{nullptr}, w_up_{nullptr};
  RowParallelLinear w_down_{nullptr};
};
TORCH_MODULE(SwiGluMlp);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& config, const parallel::TensorParallel& tp);
  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C] (gathered around each half)
  torch::Tensor forward(const torch::Tensor& x, const RotaryTables& rope) const;

 private:
  parallel::TensorParallel tp_;
  Norm attn_norm_{nullptr}, mlp_norm_{nullptr};
  Attention attn_{nullptr};
  SwiGluMlp mlp_{nullptr};
};
TORCH_MODULE(Block);

// The part of the decoder one pipeline stage holds: blocks [first_layer, first_layer + layers), plus the
// embedding on the first stage and the final norm + head on the last. The default is the whole model.
struct StageSpec {
  int64_t first_layer = 0;
  int64_t layers = -1;  // -1 = all of model.layers
  bool has_embedding = true;
  bool has_head = true;
};

class LlamaImpl : public torch::nn::Module {
 public:
  LlamaImpl(const ModelConfig& config, const parallel::TensorParallel& tp = {}, StageSpec stage = {});
  // Deterministic init from `seed`, the same full weights for every DP/TP/PP layout: each parameter is drawn
  // whole from its own generator (seeded by `seed` and its name) and this rank keeps its TP shard. Each
  // parameter's distribution is the InitRole its layer declared: normal(0, init_std); output projections (wo,
  // w_down) normal(0, init_std/sqrt(2L)); norm weights 1, biases 0.
  void init_weights(uint64_t seed);
  // Whole model: tokens [B, T] int64 -> logits [B, T, V/tp] in `compute_dtype`
  torch::Tensor forward(const torch::Tensor& tokens, torch::ScalarType compute_dtype) const;
  // Whole model: window [B, T+1] int64 (inputs = [:, :T], targets = [:, 1:]) -> fp32 losses
  CrossEntropyParts loss(const torch::Tensor& window, torch::ScalarType compute_dtype) const;

  // Pipeline-stage pieces (forward/loss above are embed -> run_blocks -> head_loss):
  // tokens [B, T] -> [B, T, C] (first stage only)
  torch::Tensor embed(const torch::Tensor& tokens, torch::ScalarType compute_dtype) const;
  // this stage's blocks: [B, T, C] -> [B, T, C]
  torch::Tensor run_blocks(const torch::Tensor& x) const;
  // final norm, head and cross-entropy (last stage only): x [B, T, C], targets [B, T] -> fp32 losses
  CrossEntropyParts head_loss(const torch::Tensor& x, const torch::Tensor& targets) const;
  const StageSpec& stage() const { return stage_; }
  const ModelConfig& config() const { return config_; }
  int64_t num_parameters() const;
  int64_t num_non_embedding_parameters() const;

 private:
  torch::Tensor logits(const torch::Tensor& x) const;  // [B, T, C] -> [B, T, V/tp]
  ModelConfig config_;
  parallel::TensorParallel tp_;
  StageSpec stage_;
  mutable RotaryTables rope_;  // moved to the activations' device on first use (run_blocks)
  VocabParallelEmbedding embed_{nullptr};
  torch::nn::ModuleDict blocks_{nullptr};  // keyed by global layer index, so names match across layouts
  Norm final_norm_{nullptr};
  ColumnParallelLinear head_{nullptr};  // absent when embeddings are tied
};
TORCH_MODULE(Llama);

}  // namespace keel::model

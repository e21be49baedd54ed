// Why: see llama.h. The forward pass reads top to bottom like the paper's block diagram; every tensor carries
// its shape in a comment.
#include "core/model/llama.h"

#include <torch/torch.h>

#include <cmath>

#include "core/model/sharding.h"
#include "core/torch_compat.h"
#include "kernels/cross_entropy.h"
#include "kernels/dispatch.h"
#include "kernels/rms_norm.h"
#include "kernels/rotary.h"
#include "kernels/swiglu.h"

namespace keel::model {

NormImpl::NormImpl(int64_t dim, const std::string& kind, double eps) : rms_(kind == "rmsnorm"), eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
  if (!rms_) bias = register_parameter("bias", torch::zeros({dim}));
}

torch::Tensor NormImpl::forward(const torch::Tensor& x) const {
  // On a GPU: one fused kernel each way (kernels/rms_norm.h) instead of ~8 memory-bound LibTorch ops.
  if (rms_ && kernels::model_uses_fused_ops(x)) return kernels::rms_norm(x, weight, eps_);
  torch::Tensor xf = x.to(torch::kFloat);  // statistics in fp32
  torch::Tensor y;
  if (rms_) {
    y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_) * weight;
  } else {
    y = torch::layer_norm(xf, {xf.size(-1)}, weight, bias, eps_);
  }
  return y.to(x.scalar_type());
}

RotaryTables make_rotary_tables(int64_t head_dim, double rotary_fraction, double theta, int64_t max_len) {
  RotaryTables tables;
  tables.rotary_dims = static_cast<int64_t>(std::floor(head_dim * rotary_fraction / 2.0)) * 2;
  const int64_t half = tables.rotary_dims / 2;
  auto fp32 = torch::TensorOptions().dtype(torch::kFloat);
  // inv_freq[i] = theta^(-2i/rotary_dims), always fp32 (CrystalCoder: lower precision here hurt training).
  torch::Tensor inv_freq =
      torch::pow(theta, -torch::arange(0, half, fp32) * 2.0 / std::max<int64_t>(tables.rotary_dims, 1));
  torch::Tensor positions = torch::arange(0, max_len, fp32);  // [T]
  torch::Tensor angles = torch::outer(positions, inv_freq);   // [T, half]
  tables.cos = angles.cos();
  tables.sin = angles.sin();
  return tables;
}

torch::Tensor apply_rotary(const torch::Tensor& x, const RotaryTables& tables) {
  if (tables.rotary_dims == 0) return x;
  if (kernels::model_uses_fused_ops(x)) return kernels::apply_rotary(x, tables.cos, tables.sin, tables.rotary_dims);
  const int64_t T = x.size(1);
  const int64_t half = tables.rotary_dims / 2;
  torch::Tensor rot = x.narrow(-1, 0, tables.rotary_dims).to(torch::kFloat);  // [B, T, h, R]
  torch::Tensor x1 = rot.narrow(-1, 0, half);                                 // [B, T, h, R/2]
  torch::Tensor x2 = rot.narrow(-1, half, half);
  torch::Tensor cos = tables.cos.narrow(0, 0, T).to(x.device()).view({1, T, 1, half});
  torch::Tensor sin = tables.sin.narrow(0, 0, T).to(x.device()).view({1, T, 1, half});
  torch::Tensor rotated = torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
  if (tables.rotary_dims == x.size(-1)) return rotated;
  return torch::cat({rotated, x.narrow(-1, tables.rotary_dims, x.size(-1) - tables.rotary_dims)}, -1);
}

AttentionImpl::AttentionImpl(const ModelConfig& c, const parallel::TensorParallel& tp)
    : local_heads_(tp.shard(c.heads, "model.heads")),
      local_kv_heads_(tp.shard(c.kv_heads, "model.kv_heads")),
      head_dim_(c.head_dim()) {
  wq_ = register_module("wq", ColumnParallelLinear(c.d_model, c.heads * head_dim_, tp, "model.heads*head_dim"));
  wk_ = register_module("wk", ColumnParallelLinear(c.d_model, c.kv_heads * head_dim_, tp, "model.kv_heads*head_dim"));
  wv_ = register_module("wv", ColumnParallelLinear(c.d_model, c.kv_heads * head_dim_, tp, "model.kv_heads*head_dim"));
  wo_ = register_module("wo", RowParallelLinear(c.heads * head_dim_, c.d_model, tp, "model.heads*head_dim"));
  if (c.qk_norm) {
    q_norm_ = register_module("q_norm", Norm(head_dim_, "rmsnorm", c.norm_eps));
    k_norm_ = register_module("k_norm", Norm(head_dim_, "rmsnorm", c.norm_eps));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const RotaryTables& rope) const {
  const int64_t B = x.size(0), T = x.size(1);
  torch::Tensor q = wq_->forward(x).view({B, T, local_heads_, head_dim_});     // [B, T, H, D]
  torch::Tensor k = wk_->forward(x).view({B, T, local_kv_heads_, head_dim_});  // [B, T, K, D]
  torch::Tensor v = wv_->forward(x).view({B, T, local_kv_heads_, head_dim_});  // [B, T, K, D]
  if (q_norm_) {
    q = q_norm_->forward(q);
    k = k_norm_->forward(k);
  }
  q = apply_rotary(q, rope).transpose(1, 2);  // [B, H, T, D]
  k = apply_rotary(k, rope).transpose(1, 2);  // [B, K, T, D]
  v = v.transpose(1, 2);                      // [B, K, T, D]
  if (local_kv_heads_ != local_heads_) {      // GQA: each kv head serves H/K query heads
    const int64_t group = local_heads_ / local_kv_heads_;
    k = k.repeat_interleave(group, /*dim=*/1);  // [B, H, T, D]
    v = v.repeat_interleave(group, /*dim=*/1);
  }
  torch::Tensor y = compat::causal_attention(q, k, v);              // [B, H, T, D]
  y = y.transpose(1, 2).reshape({B, T, local_heads_ * head_dim_});  // [B, T, H*D]
  return wo_->forward(y);                                           // [B, T, C]
}

SwiGluMlpImpl::SwiGluMlpImpl(const ModelConfig& c, const parallel::TensorParallel& tp) {
  w_gate_ = register_module("w_gate", ColumnParallelLinear(c.d_model, c.ffn_hidden, tp, "model.ffn_hidden"));
  w_up_ = register_module("w_up", ColumnParallelLinear(c.d_model, c.ffn_hidden, tp, "model.ffn_hidden"));
  w_down_ = register_module("w_down", RowParallelLinear(c.ffn_hidden, c.d_model, tp, "model.ffn_hidden"));
}

torch::Tensor SwiGluMlpImpl::forward(const torch::Tensor& x) const {
  if (kernels::model_uses_fused_ops(x))
    return w_down_->forward(kernels::swiglu(w_gate_->forward(x), w_up_->forward(x)));
  return w_down_->forward(torch::silu(w_gate_->forward(x)) * w_up_->forward(x));  // [B, T, F] -> [B, T, C]
}

BlockImpl::BlockImpl(const ModelConfig& c, const parallel::TensorParallel& tp) {
  attn_norm_ = register_module("attn_norm", Norm(c.d_model, c.norm, c.norm_eps));
  attn_ = register_module("attn", Attention(c, tp));
  mlp_norm_ = register_module("mlp_norm", Norm(c.d_model, c.norm, c.norm_eps));
  mlp_ = register_module("mlp", SwiGluMlp(c, tp));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const RotaryTables& rope) const {
  torch::Tensor h = x + attn_->forward(attn_norm_->forward(x), rope);  // [B, T, C]
  return h + mlp_->forward(mlp_norm_->forward(h));                     // [B, T, C]
}

LlamaImpl::LlamaImpl(const ModelConfig& c, const parallel::TensorParallel& tp, StageSpec stage)
    : config_(c),
      tp_(tp),
      stage_(stage),
      rope_(make_rotary_tables(c.head_dim(), c.rotary_fraction, c.rope_theta, c.seq_len)) {
  if (stage_.layers < 0) stage_.layers = c.layers - stage_.first_layer;
  TORCH_CHECK(stage_.first_layer >= 0 && stage_.first_layer + stage_.layers <= c.layers, "stage layers [",
              stage_.first_layer, ", ", stage_.first_layer + stage_.layers, ") outside model.layers ", c.layers);
  TORCH_CHECK(!c.tie_embeddings || (stage_.has_embedding && stage_.has_head),
              "model.tie_embeddings needs the embedding and the head on the same pipeline stage (parallel.pp = 1)");
  if (stage_.has_embedding || c.tie_embeddings)
    embed_ = register_module("embed", VocabParallelEmbedding(c.vocab, c.d_model, tp));
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> blocks;
  for (int64_t layer = stage_.first_layer; layer < stage_.first_layer + stage_.layers; ++layer)
    blocks.emplace_back(std::to_string(layer), Block(c, tp).ptr());
  blocks_ = register_module("blocks", torch::nn::ModuleDict(blocks));
  if (stage_.has_head) {
    final_norm_ = register_module("final_norm", Norm(c.d_model, c.norm, c.norm_eps));
    if (!c.tie_embeddings) head_ = register_module("head", ColumnParallelLinear(c.d_model, c.vocab, tp, "model.vocab"));
  }
}

namespace {
// A 64-bit seed per (run seed, parameter name): FNV-1a of the name mixed with the seed by splitmix64.
uint64_t parameter_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  uint64_t z = seed + 0x9e3779b97f4a7c15ull + h;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

void LlamaImpl::init_weights(uint64_t seed) {
  torch::NoGradGuard no_grad;
  const double out_std = config_.init_std / std::sqrt(2.0 * config_.layers);
  const auto specs = shard_specs(*this);
  size_t index = 0;
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    const ShardSpec& spec = specs.at(index++).second;
    const bool is_norm = name.find("norm") != std::string::npos;
    if (is_norm) {
      if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0)
        p.zero_();
      else
        p.fill_(1.0);
      continue;
    }
    const bool is_output_proj = name.find(".wo.") != std::string::npos || name.find(".w_down.") != std::string::npos;
    auto generator = at::detail::createCPUGenerator(parameter_seed(seed, name));
    const torch::Tensor full = at::normal(0.0, is_output_proj ? out_std : config_.init_std,
                                          global_shape(p.sizes(), spec, tp_.size), generator);
    p.copy_(shard_of(full, spec, tp_.rank, tp_.size));
  }
}

torch::Tensor LlamaImpl::embed(const torch::Tensor& tokens, torch::ScalarType compute_dtype) const {
  TORCH_CHECK(stage_.has_embedding, "embed() called on a pipeline stage without the embedding");
  return embed_->forward(tokens, compute_dtype);  // [B, T, C]
}

torch::Tensor LlamaImpl::run_blocks(const torch::Tensor& x_in) const {
  torch::Tensor x = x_in;                  // [B, T, C]
  if (rope_.cos.device() != x.device()) {  // the tables follow the activations once, not per call
    rope_.cos = rope_.cos.to(x.device());
    rope_.sin = rope_.sin.to(x.device());
  }
  for (const auto& block : blocks_->values()) x = block->as<BlockImpl>()->forward(x, rope_);
  return x;
}

torch::Tensor LlamaImpl::logits(const torch::Tensor& x_in) const {
  torch::Tensor x = final_norm_->forward(x_in);  // [B, T, C]
  if (head_) return head_->forward(x);           // [B, T, V/tp]
  return embed_->project(x);                     // tied: [B, T, V/tp]
}

torch::Tensor LlamaImpl::forward(const torch::Tensor& tokens, torch::ScalarType compute_dtype) const {
  TORCH_CHECK(stage_.has_embedding && stage_.has_head,
              "forward() needs the whole model (pipeline stages use embed/run_blocks/head_loss)");
  return logits(run_blocks(embed(tokens, compute_dtype)));
}

CrossEntropyParts LlamaImpl::head_loss(const torch::Tensor& x, const torch::Tensor& targets) const {
  TORCH_CHECK(stage_.has_head, "head_loss() called on a pipeline stage without the head");
  if (tp_.size == 1 && kernels::model_uses_fused_ops(x)) {
    // On a GPU with one vocabulary shard: the head and the loss fused, chunk by chunk, so that the [B*T, V]
    // logits (and their fp32 copy) never exist at once (kernels/cross_entropy.h).
    torch::Tensor h = final_norm_->forward(x);                        // [B, T, C]
    h = h.reshape({-1, h.size(-1)});                                  // [N, C]
    const torch::Tensor& w = head_ ? head_->weight : embed_->weight;  // [V, C] fp32
    const kernels::FusedCrossEntropy parts =
        kernels::fused_linear_cross_entropy(h, w, targets.reshape({-1}), config_.z_loss,
                                            kernels::cross_entropy_chunk_rows(h.size(0), w.size(0), h.size(1)));
    return {parts.loss, parts.nll, parts.z_loss};
  }
  torch::Tensor logits_local = logits(x);  // [B, T, V/tp]
  return vocab_parallel_cross_entropy(logits_local.reshape({-1, logits_local.size(-1)}), targets.reshape({-1}),
                                      config_.z_loss, tp_);
}

CrossEntropyParts LlamaImpl::loss(const torch::Tensor& window, torch::ScalarType compute_dtype) const {
  const int64_t T = window.size(1) - 1;
  TORCH_CHECK(T <= config_.seq_len, "window of ", T, " tokens exceeds model.seq_len ", config_.seq_len);
  torch::Tensor inputs = window.narrow(1, 0, T);   // [B, T]
  torch::Tensor targets = window.narrow(1, 1, T);  // [B, T]
  return head_loss(run_blocks(embed(inputs, compute_dtype)), targets);
}

int64_t LlamaImpl::num_parameters() const {
  int64_t total = 0;
  for (const auto& p : parameters()) total += p.numel();
  return total;
}

int64_t LlamaImpl::num_non_embedding_parameters() const {
  return num_parameters() - (embed_ ? embed_->weight.numel() : 0);
}

}  // namespace keel::model

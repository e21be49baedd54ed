// Why: see llama.h. The forward pass reads top to bottom like the paper's block diagram; every tensor carries
// its shape in a comment.
#include "core/model/llama.h"

#include <torch/torch.h>

#include <cmath>

#include "core/model/forward_stats.h"
#include "core/model/parametrization.h"
#include "core/model/recompute.h"
#include "core/model/sharding.h"
#include "core/parallel/tp_ops.h"
#include "core/torch_compat.h"

namespace keel::model {

NormImpl::NormImpl(int64_t dim, NormKind kind, double eps, bool grad_partial_over_tp)
    : rms_(kind == NormKind::kRmsNorm), eps_(eps) {
  const ShardSpec replicated{/*dim=*/-1, grad_partial_over_tp};
  weight = declare_parameter("weight", torch::ones({dim}), {replicated, InitRole::kOnes});
  if (!rms_) bias = declare_parameter("bias", torch::zeros({dim}), {replicated, InitRole::kZeros});
}

torch::Tensor NormImpl::forward(const torch::Tensor& x) const {
  return rms_ ? rms_norm(x, weight, eps_) : layer_norm(x, weight, bias, eps_);  // [..., dim]
}

AttentionImpl::AttentionImpl(const ModelConfig& c, const parallel::TensorParallel& tp)
    : local_heads_(tp.shard(c.heads, "model.heads")),
      local_kv_heads_(tp.shard(c.kv_heads, "model.kv_heads")),
      head_dim_(c.head_dim()),
      query_multiplier_(mup_query_multiplier(c)) {
  wq_ = register_module("wq", ColumnParallelLinear(c.d_model, c.heads * head_dim_, tp, "model.heads*head_dim"));
  wk_ = register_module("wk", ColumnParallelLinear(c.d_model, c.kv_heads * head_dim_, tp, "model.kv_heads*head_dim"));
  wv_ = register_module("wv", ColumnParallelLinear(c.d_model, c.kv_heads * head_dim_, tp, "model.kv_heads*head_dim"));
  wo_ = register_module(
      "wo", RowParallelLinear(c.heads * head_dim_, c.d_model, tp, "model.heads*head_dim", InitRole::kOutputNormal));
  if (c.qk_norm) {  // per-head norms over this rank's heads only: gradients are partial sums over TP
    q_norm_ = register_module("q_norm", Norm(head_dim_, NormKind::kRmsNorm, c.norm_eps, /*grad_partial_over_tp=*/true));
    k_norm_ = register_module("k_norm", Norm(head_dim_, NormKind::kRmsNorm, c.norm_eps, /*grad_partial_over_tp=*/true));
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
  // μP: attention logits scale as sqrt(D0) / D instead of 1 / sqrt(D) (parametrization.h).
  if (query_multiplier_ != 1.0) q = q * query_multiplier_;
  // Stats steps only (metrics.stats_every): the largest q.k/sqrt(D) of each head.
  if (ForwardStats* stats = active_forward_stats()) record_attention_logits(*stats, q, k);
  torch::Tensor y = compat::causal_attention(q, k, v);              // [B, H, T, D]
  y = y.transpose(1, 2).reshape({B, T, local_heads_ * head_dim_});  // [B, T, H*D]
  return wo_->forward(y);                                           // [B, T, C]
}

SwiGluMlpImpl::SwiGluMlpImpl(const ModelConfig& c, const parallel::TensorParallel& tp) {
  w_gate_ = register_module("w_gate", ColumnParallelLinear(c.d_model, c.ffn_hidden, tp, "model.ffn_hidden"));
  w_up_ = register_module("w_up", ColumnParallelLinear(c.d_model, c.ffn_hidden, tp, "model.ffn_hidden"));
  w_down_ = register_module(
      "w_down", RowParallelLinear(c.ffn_hidden, c.d_model, tp, "model.ffn_hidden", InitRole::kOutputNormal));
}

torch::Tensor SwiGluMlpImpl::forward(const torch::Tensor& x) const {
  return w_down_->forward(swiglu(w_gate_->forward(x), w_up_->forward(x)));  // [B, T, F] -> [B, T, C]
}

// Under sequence parallelism a norm sees only this rank's rows: its weight gradient is a partial sum over TP.
BlockImpl::BlockImpl(const ModelConfig& c, const parallel::TensorParallel& tp) : tp_(tp) {
  attn_norm_ = register_module("attn_norm", Norm(c.d_model, c.norm, c.norm_eps, tp.sp()));
  attn_ = register_module("attn", Attention(c, tp));
  mlp_norm_ = register_module("mlp_norm", Norm(c.d_model, c.norm, c.norm_eps, tp.sp()));
  mlp_ = register_module("mlp", SwiGluMlp(c, tp));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const RotaryTables& rope) const {
  // Under SP x and h are [B, T/tp, C]: each half's normed input is gathered over the sequence for the
  // column-parallel projections ([B, T, C]), and its row-parallel projection scatters the sum back.
  const auto to_tp_region = [this](const torch::Tensor& normed) {
    return tp_.sp() ? parallel::gather_from_sequence_region(normed, tp_) : normed;  // [B, T, C]
  };
  torch::Tensor h = x + attn_->forward(to_tp_region(attn_norm_->forward(x)), rope);  // [B, T, C]
  return h + mlp_->forward(to_tp_region(mlp_norm_->forward(h)));                     // [B, T, C]
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
    final_norm_ = register_module("final_norm", Norm(c.d_model, c.norm, c.norm_eps, tp.sp()));
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
  const auto specs = parameter_specs(*this);
  size_t index = 0;
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    const ParameterSpec& spec = specs.at(index++).second;
    switch (spec.init) {
      case InitRole::kOnes:
        p.fill_(1.0);
        continue;
      case InitRole::kZeros:
        p.zero_();
        continue;
      case InitRole::kNormal:
      case InitRole::kOutputNormal:
        break;
      case InitRole::kUndeclared:
        TORCH_CHECK(false, "init_weights: parameter ", name, " was registered without an InitRole");
    }
    auto generator = at::detail::createCPUGenerator(parameter_seed(seed, name));
    const double std = (spec.init == InitRole::kOutputNormal ? out_std : config_.init_std) *
                       mup_init_scale(config_, name, static_cast<int64_t>(p.dim()));
    const torch::Tensor full = at::normal(0.0, std, global_shape(p.sizes(), spec.shard, tp_.size), generator);
    p.copy_(shard_of(full, spec.shard, tp_.rank, tp_.size));
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
  const RotaryTables& rope = rope_;
  int64_t index = 0;  // this stage's block index, for the forward statistics of a stats step
  for (const auto& module : blocks_->values()) {
    std::shared_ptr<BlockImpl> block = std::dynamic_pointer_cast<BlockImpl>(module);
    ForwardStats* stats = active_forward_stats();
    if (stats) stats->layer = index;
    ++index;
    if (config_.recompute == Recompute::kNone) {
      x = block->forward(x, rope);
      if (stats) record_block_output(*stats, x);
      continue;
    }
    // The closure keeps the block and the tables alive until the recomputing backward has run.
    x = run_recomputed(
        config_.recompute, [block, rope](const torch::Tensor& input) { return block->forward(input, rope); }, x);
    if (stats) record_block_output(*stats, x);
  }
  return x;
}

torch::Tensor LlamaImpl::logits(const torch::Tensor& x_in) const {
  torch::Tensor x = final_norm_->forward(x_in);                     // [B, T, C] (SP: [B, T/tp, C])
  if (tp_.sp()) x = parallel::gather_from_sequence_region(x, tp_);  // [B, T, C]
  // μP's readout multiplier (logits / width ratio), applied to the normed activations: the same product.
  if (const double m = mup_output_multiplier(config_); m != 1.0) x = x * m;
  if (head_) return head_->forward(x);  // [B, T, V/tp]
  return embed_->project(x);            // tied: [B, T, V/tp]
}

torch::Tensor LlamaImpl::forward(const torch::Tensor& tokens, torch::ScalarType compute_dtype) const {
  TORCH_CHECK(stage_.has_embedding && stage_.has_head,
              "forward() needs the whole model (pipeline stages use embed/run_blocks/head_loss)");
  return logits(run_blocks(embed(tokens, compute_dtype)));
}

CrossEntropyParts LlamaImpl::head_loss(const torch::Tensor& x, const torch::Tensor& targets) const {
  TORCH_CHECK(stage_.has_head, "head_loss() called on a pipeline stage without the head");
  torch::Tensor h = final_norm_->forward(x);                        // [B, T, C] (SP: [B, T/tp, C])
  if (tp_.sp()) h = parallel::gather_from_sequence_region(h, tp_);  // [B, T, C] for the vocab-parallel head
  // μP's readout multiplier (logits / width ratio), applied to the normed activations: the same product.
  if (const double m = mup_output_multiplier(config_); m != 1.0) h = h * m;
  const torch::Tensor& w = head_ ? head_->weight : embed_->weight;  // [V/tp, C] fp32
  const auto logits_of = [this](const torch::Tensor& normed) {
    return head_ ? head_->forward(normed) : embed_->project(normed);  // [B, T, V/tp]
  };
  if (ForwardStats* stats = active_forward_stats()) {  // stats steps only: the logits once more, without autograd
    torch::NoGradGuard no_grad;
    const torch::Tensor logits = logits_of(h.detach());  // [B, T, V/tp]
    record_logits(*stats, logits.reshape({-1, logits.size(-1)}), tp_);
  }
  return head_cross_entropy(h, w, targets, config_.z_loss, tp_, logits_of);
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

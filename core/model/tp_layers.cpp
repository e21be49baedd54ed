// Why: see tp_layers.h. Shard arithmetic plus the two places a layer communicates (copy_to_tp_region before a
// column-parallel or vocab-parallel matmul, reduce_from_tp_region after a row-parallel matmul or the vocabulary
// lookup), and the vocab-parallel cross-entropy, whose backward is written out so that it needs no collective.
#include "core/model/tp_layers.h"

#include <torch/torch.h>

#include "core/model/recompute.h"
#include "core/parallel/tp_ops.h"

namespace keel::model {
namespace {

using parallel::copy_to_tp_region;
using parallel::reduce_from_tp_region;
using parallel::reduce_scatter_to_sequence_region;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Megatron's _VocabParallelCrossEntropy: every statistic in fp32, reduced over the TP group in forward (global
// max, then sum-exp and the target's logit in one all-reduce); backward only rescales the saved softmax.
// Outputs {loss, nll, z_loss}; each may be differentiated (loss = nll + z_loss).
class VocabParallelCrossEntropy : public torch::autograd::Function<VocabParallelCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& logits, const torch::Tensor& targets,
                               double z_loss_coef, const parallel::TensorParallel& tp) {
    const int64_t local_vocab = logits.size(1);
    const int64_t vocab_start = tp.rank * local_vocab;
    torch::Tensor logits_f = logits.to(torch::kFloat);                // [N, V/tp] fp32
    torch::Tensor max_logit = std::get<0>(logits_f.max(/*dim=*/-1));  // [N] this rank's max
    tp.group->all_reduce(max_logit, parallel::ReduceOp::kMax);        // [N] max over the vocabulary
    torch::Tensor shifted = logits_f - max_logit.unsqueeze(-1);       // [N, V/tp] <= 0
    torch::Tensor exp_shifted = shifted.exp();                        // [N, V/tp]
    torch::Tensor owned = (targets >= vocab_start) & (targets < vocab_start + local_vocab);    // [N] bool
    torch::Tensor local_target = (targets - vocab_start).masked_fill(owned.logical_not(), 0);  // [N] column here
    torch::Tensor target_shifted =
        shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(owned.logical_not(), 0.0);  // [N]
    // One all-reduce for both sums: row 0 sum-exp, row 1 the target's shifted logit (found on exactly one rank).
    torch::Tensor sums = torch::stack({exp_shifted.sum(-1), target_shifted});  // [2, N]
    tp.group->all_reduce(sums, parallel::ReduceOp::kSum);
    torch::Tensor log_sum_exp = sums[0].log();                        // [N] log Z - max
    torch::Tensor log_z = log_sum_exp + max_logit;                    // [N] log Z
    torch::Tensor row_nll = log_sum_exp - sums[1];                    // [N] -log p(target)
    torch::Tensor nll = row_nll.mean();                               // scalar: mean -log p(target)
    torch::Tensor softmax = exp_shifted.div_(sums[0].unsqueeze(-1));  // [N, V/tp] this rank's columns

    torch::Tensor z_loss, loss;
    if (z_loss_coef > 0.0) {
      z_loss = z_loss_coef * log_z.pow(2).mean();  // scalar
      loss = nll + z_loss;
    } else {
      z_loss = torch::zeros({}, logits_f.options());
      loss = nll.clone();  // distinct from `nll`: each output of a Function is its own tensor
    }
    // One call: each call replaces the set of non-differentiable outputs.
    if (z_loss_coef > 0.0) {
      ctx->mark_non_differentiable({row_nll});
    } else {
      ctx->mark_non_differentiable({z_loss, row_nll});
    }
    ctx->save_for_backward({softmax, log_z, local_target, owned});
    ctx->saved_data["z_loss_coef"] = z_loss_coef;
    ctx->saved_data["logits_dtype"] = logits.scalar_type();
    return {loss, nll, z_loss, row_nll};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& softmax = saved[0];       // [N, V/tp] fp32
    const torch::Tensor& log_z = saved[1];         // [N] fp32
    const torch::Tensor& local_target = saved[2];  // [N] int64
    const torch::Tensor& owned = saved[3];         // [N] bool
    const double z_loss_coef = ctx->saved_data["z_loss_coef"].toDouble();
    const auto logits_dtype = ctx->saved_data["logits_dtype"].toScalarType();
    const int64_t N = softmax.size(0);
    // loss = nll + z_loss, so each term's weight is the gradient of `loss` plus that of its own output.
    torch::Tensor nll_weight = (grad_outputs[0] + grad_outputs[1]).to(torch::kFloat);     // scalar
    torch::Tensor z_loss_weight = (grad_outputs[0] + grad_outputs[2]).to(torch::kFloat);  // scalar
    // d nll / d x_ij = (softmax_ij - [j == t_i]) / N;  d z_loss / d x_ij = 2 coef logZ_i softmax_ij / N.
    torch::Tensor softmax_scale = nll_weight + z_loss_weight * (2.0 * z_loss_coef) * log_z;  // [N]
    torch::Tensor grad_logits = softmax * softmax_scale.unsqueeze(-1);                       // [N, V/tp]
    torch::Tensor minus_one_hot = (-nll_weight * owned.to(torch::kFloat)).unsqueeze(-1);     // [N, 1]
    grad_logits.scatter_add_(1, local_target.unsqueeze(-1), minus_one_hot);
    grad_logits.div_(static_cast<double>(N));
    return {grad_logits.to(logits_dtype), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

ColumnParallelLinearImpl::ColumnParallelLinearImpl(int64_t in_features, int64_t out_features,
                                                   const parallel::TensorParallel& tp, const std::string& what,
                                                   InitRole init)
    : tp_(tp) {
  parallel::require_tp_group(tp, "ColumnParallelLinear (" + what + ")");
  weight = declare_parameter("weight", torch::empty({tp.shard(out_features, what), in_features}),
                             {ShardSpec{/*dim=*/0, false}, init});
}

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) const {
  // Backward sums this rank's partial input gradient over TP (under SP the caller's gather does, in its backward).
  // Selective recomputation keeps the output.
  const torch::Tensor input = tp_.sp() ? x : copy_to_tp_region(x, tp_);  // [..., in]
  return kept_gemm(input, weight.to(x.scalar_type()), [](const auto& input, const auto& w) {
    return torch::nn::functional::linear(input, w);  // [..., out/tp]
  });
}

RowParallelLinearImpl::RowParallelLinearImpl(int64_t in_features, int64_t out_features,
                                             const parallel::TensorParallel& tp, const std::string& what, InitRole init)
    : tp_(tp) {
  parallel::require_tp_group(tp, "RowParallelLinear (" + what + ")");
  weight = declare_parameter("weight", torch::empty({out_features, tp.shard(in_features, what)}),
                             {ShardSpec{/*dim=*/1, false}, init});
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) const {
  // Selective recomputation keeps the reduced output, so its re-run issues no all-reduce (under SP, whose
  // reduce-scatter has an all-gather for backward, the kept output's gradient is gathered first).
  if (tp_.sp()) {
    const parallel::TensorParallel tp = tp_;
    return kept_gemm(
        x, weight.to(x.scalar_type()),
        [tp](const auto& input, const auto& w) {
          torch::Tensor partial = torch::nn::functional::linear(input, w);  // [B, T, out] this rank's part
          return reduce_scatter_to_sequence_region(partial, tp);            // [B, T/tp, out]
        },
        [tp](const torch::Tensor& grad) { return parallel::gather_from_sequence_region(grad, tp); });
  }
  return kept_gemm(x, weight.to(x.scalar_type()), [this](const auto& input, const auto& w) {
    torch::Tensor partial = torch::nn::functional::linear(input, w);  // [..., out] this rank's part
    return reduce_from_tp_region(partial, tp_);                       // [..., out]
  });
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, const parallel::TensorParallel& tp)
    : tp_(tp) {
  parallel::require_tp_group(tp, "VocabParallelEmbedding");
  const int64_t local_vocab = tp.shard(vocab, "model.vocab");
  vocab_start_ = tp.rank * local_vocab;
  weight =
      declare_parameter("weight", torch::empty({local_vocab, dim}), {ShardSpec{/*dim=*/0, false}, InitRole::kNormal});
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& tokens, torch::ScalarType dtype) const {
  // Gather in fp32 from the master, then cast: the backward scatter-adds fp32 gradients.
  if (tp_.single()) return torch::embedding(weight, tokens).to(dtype);  // [B, T, C]
  const int64_t local_vocab = weight.size(0);
  torch::Tensor foreign = (tokens < vocab_start_) | (tokens >= vocab_start_ + local_vocab);          // [B, T] bool
  torch::Tensor local_ids = (tokens - vocab_start_).masked_fill(foreign, 0);                         // [B, T] rows here
  torch::Tensor rows = torch::embedding(weight, local_ids).masked_fill(foreign.unsqueeze(-1), 0.0);  // [B, T, C]
  // Exactly one rank contributes each token's row, so the sum is exact even in bf16.
  if (tp_.sp()) return reduce_scatter_to_sequence_region(rows.to(dtype), tp_);  // [B, T/tp, C]
  return reduce_from_tp_region(rows.to(dtype), tp_);                            // [B, T, C]
}

torch::Tensor VocabParallelEmbeddingImpl::project(const torch::Tensor& x) const {
  const torch::Tensor input = tp_.sp() ? x : copy_to_tp_region(x, tp_);     // [..., C]
  return torch::nn::functional::linear(input, weight.to(x.scalar_type()));  // [..., V/tp]
}

CrossEntropyParts vocab_parallel_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                               double z_loss_coef, const parallel::TensorParallel& tp) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
              "vocab_parallel_cross_entropy wants logits [N, V/tp] and targets [N], got ", logits.sizes(), " and ",
              targets.sizes());
  CrossEntropyParts parts;
  if (!tp.single()) {
    parallel::require_tp_group(tp, "vocab_parallel_cross_entropy");
    variable_list losses = VocabParallelCrossEntropy::apply(logits, targets, z_loss_coef, tp);
    parts.loss = losses[0];
    parts.nll = losses[1];
    parts.z_loss = losses[2];
    parts.row_nll = losses[3];
    return parts;
  }
  // One rank holds the whole vocabulary: plain autograd (the reference the TP path is tested against).
  torch::Tensor logits_f = logits.to(torch::kFloat);                                    // [N, V] fp32 statistics
  torch::Tensor log_z = torch::logsumexp(logits_f, /*dim=*/-1);                         // [N]
  torch::Tensor target_logit = logits_f.gather(-1, targets.unsqueeze(-1)).squeeze(-1);  // [N]
  torch::Tensor row_nll = log_z - target_logit;                                         // [N]
  torch::Tensor nll = row_nll.mean();
  parts.nll = nll;
  parts.row_nll = row_nll.detach();
  if (z_loss_coef > 0.0) {
    parts.z_loss = z_loss_coef * log_z.pow(2).mean();
    parts.loss = nll + parts.z_loss;
  } else {
    parts.z_loss = torch::zeros({}, logits_f.options());
    parts.loss = nll;
  }
  return parts;
}

}  // namespace keel::model

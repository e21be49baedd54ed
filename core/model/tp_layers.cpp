// Why: see tp_layers.h. The shard arithmetic lives here; collectives join when tp.size > 1 is supported.
#include "core/model/tp_layers.h"

#include <torch/torch.h>

namespace keel::model {
namespace {
void require_single(const parallel::TensorParallel& tp) {
  TORCH_CHECK(tp.single(), "tensor-parallel size ", tp.size,
              " requested, but this build of Keel only runs parallel.tp = 1 (the TP collectives are not in yet)");
}
}  // namespace

ColumnParallelLinearImpl::ColumnParallelLinearImpl(int64_t in_features, int64_t out_features,
                                                   const parallel::TensorParallel& tp, const std::string& what) {
  require_single(tp);
  weight = register_parameter("weight", torch::empty({tp.shard(out_features, what), in_features}));
}

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) const {
  return torch::nn::functional::linear(x, weight.to(x.scalar_type()));
}

RowParallelLinearImpl::RowParallelLinearImpl(int64_t in_features, int64_t out_features,
                                             const parallel::TensorParallel& tp, const std::string& what) {
  require_single(tp);
  weight = register_parameter("weight", torch::empty({out_features, tp.shard(in_features, what)}));
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) const {
  return torch::nn::functional::linear(x, weight.to(x.scalar_type()));
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, const parallel::TensorParallel& tp) {
  require_single(tp);
  weight = register_parameter("weight", torch::empty({tp.shard(vocab, "model.vocab"), dim}));
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& tokens, torch::ScalarType dtype) const {
  // Gather in fp32 from the master, then cast: the backward scatter-adds fp32 gradients.
  return torch::embedding(weight, tokens).to(dtype);  // [B, T, C]
}

CrossEntropyParts vocab_parallel_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                               double z_loss_coef, const parallel::TensorParallel& tp) {
  require_single(tp);
  torch::Tensor logits_f = logits.to(torch::kFloat);              // [N, V] fp32 statistics
  torch::Tensor log_z = torch::logsumexp(logits_f, /*dim=*/-1);   // [N]
  torch::Tensor target_logit = logits_f.gather(-1, targets.unsqueeze(-1)).squeeze(-1);  // [N]
  torch::Tensor nll = (log_z - target_logit).mean();
  CrossEntropyParts parts;
  parts.nll = nll;
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

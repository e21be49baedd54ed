// Why: the optimizer-side math the core keeps for itself (optimizers are plugins, plugins/adamw and
// plugins/lion): the configured LR schedule, per-tensor norms (one device tensor, no host sync) and global-norm
// clipping, which run before any plugin sees the gradients.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace keel::optim {

struct NamedParameter {
  std::string name;
  at::Tensor param;  // fp32 master weight (requires grad; its .grad() is the fp32 gradient)
  bool decay;        // weight decay applies (matrices: true; norm weights/biases: false)
};

// Warm-up (linear from lr/warmup to lr) then cosine decay to min_lr at `decay_steps`, constant after.
double warmup_cosine_lr(int64_t step, double lr, double min_lr, int64_t warmup_steps, int64_t decay_steps);

// Per-tensor L2 norms of the gradients: [n] fp32 (one device tensor, no host sync).
at::Tensor per_tensor_grad_norms(const std::vector<NamedParameter>& params);
at::Tensor per_tensor_param_norms(const std::vector<NamedParameter>& params);
// Global norm from per-tensor norms: sqrt(sum norms^2).
at::Tensor global_norm(const at::Tensor& per_tensor_norms);
// Scale all gradients by min(1, max_norm / (norm + 1e-6)); returns the factor applied.
double clip_grads_by_global_norm(const std::vector<NamedParameter>& params, double total_norm, double max_norm);

}  // namespace keel::optim

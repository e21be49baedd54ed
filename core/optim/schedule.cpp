// Why: see schedule.h.
#include "core/optim/schedule.h"

#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

namespace keel::optim {

double warmup_cosine_lr(int64_t step, double lr, double min_lr, int64_t warmup_steps, int64_t decay_steps) {
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (decay_steps <= warmup_steps) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

at::Tensor per_tensor_grad_norms(const std::vector<NamedParameter>& params) {
  std::vector<torch::Tensor> norms;
  norms.reserve(params.size());
  for (const auto& p : params) {
    const torch::Tensor& grad = p.param.grad();
    norms.push_back(grad.defined() ? grad.norm().to(torch::kFloat) : torch::zeros({}, p.param.options()));
  }
  return torch::stack(norms);  // [n]
}

at::Tensor per_tensor_param_norms(const std::vector<NamedParameter>& params) {
  std::vector<torch::Tensor> norms;
  norms.reserve(params.size());
  for (const auto& p : params) norms.push_back(p.param.detach().norm().to(torch::kFloat));
  return torch::stack(norms);  // [n]
}

at::Tensor global_norm(const at::Tensor& per_tensor_norms) {
  return per_tensor_norms.to(torch::kDouble).pow(2).sum().sqrt();
}

double clip_grads_by_global_norm(const std::vector<NamedParameter>& params, double total_norm, double max_norm) {
  if (max_norm <= 0.0 || !std::isfinite(total_norm)) return 1.0;
  const double factor = max_norm / (total_norm + 1e-6);
  if (factor >= 1.0) return 1.0;
  torch::NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.param.grad().defined()) p.param.grad().mul_(factor);
  return factor;
}

}  // namespace keel::optim

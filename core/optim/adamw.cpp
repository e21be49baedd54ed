// Why: see adamw.h. Plain per-tensor ops; the fused multi-tensor GPU version lives in kernels/ (GPU issue).
#include "core/optim/adamw.h"

#include <cmath>
#include <stdexcept>

#include <torch/torch.h>

namespace keel::optim {

AdamW::AdamW(std::vector<NamedParameter> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& p : params_) {
    TORCH_CHECK(p.param.scalar_type() == torch::kFloat, "AdamW expects fp32 master weights; ", p.name, " is ",
                p.param.scalar_type());
    exp_avg_.push_back(torch::zeros_like(p.param));
    exp_avg_sq_.push_back(torch::zeros_like(p.param));
  }
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bias_correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bias_correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor param = params_[i].param;
    const torch::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    if (params_[i].decay && options_.weight_decay != 0.0) param.mul_(1.0 - lr * options_.weight_decay);
    exp_avg_[i].lerp_(grad, 1.0 - options_.beta1);
    exp_avg_sq_[i].mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
    torch::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(options_.eps);
    param.addcdiv_(exp_avg_[i], denom, -step_size);
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back(params_[i].name + "/exp_avg", exp_avg_[i]);
    out.emplace_back(params_[i].name + "/exp_avg_sq", exp_avg_sq_[i]);
  }
  return out;
}

void AdamW::load_state_tensors(const std::vector<std::pair<std::string, at::Tensor>>& named, int64_t step_count) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (const char* kind : {"/exp_avg", "/exp_avg_sq"}) {
      const std::string key = params_[i].name + kind;
      bool found = false;
      for (const auto& [name, tensor] : named) {
        if (name != key) continue;
        TORCH_CHECK(tensor.sizes() == params_[i].param.sizes(), "optimizer state ", key, " has shape ", tensor.sizes(),
                    ", expected ", params_[i].param.sizes());
        (std::string(kind) == "/exp_avg" ? exp_avg_[i] : exp_avg_sq_[i]).copy_(tensor);
        found = true;
      }
      TORCH_CHECK(found, "optimizer state ", key, " missing");
    }
  }
  step_ = step_count;
}

double warmup_cosine_lr(int64_t step, double lr, double min_lr, int64_t warmup_steps, int64_t decay_steps) {
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (decay_steps <= warmup_steps) return lr;
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps - warmup_steps));
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

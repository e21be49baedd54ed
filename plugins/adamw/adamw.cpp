// Why: Keel's default optimizer, as a plugin: AdamW over the named fp32 master weights, identical to
// torch.optim.AdamW (decoupled weight decay, bias correction). Its state has stable names
// ("<param>/exp_avg", "<param>/exp_avg_sq", and "step" in its JSON) so checkpoints are complete and another
// optimizer (lion) can adopt the moments by name.
// Arguments (plugin.adamw.KEY, defaulting to the optim.* config keys): beta1, beta2, eps, weight_decay.
// On a GPU the step goes through the host's multi-tensor kernel (StepContext::kernels) when Keel provides one.
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "../common/lr_groups.h"
#include "keel/plugin.h"

namespace {

class AdamW : public keel::sdk::Plugin {
 public:
  explicit AdamW(const keel::sdk::Args& args)
      : beta1_(keel::sdk::arg_double(args, "beta1", keel::sdk::arg_double(args, "optim.beta1", 0.9))),
        beta2_(keel::sdk::arg_double(args, "beta2", keel::sdk::arg_double(args, "optim.beta2", 0.95))),
        eps_(keel::sdk::arg_double(args, "eps", keel::sdk::arg_double(args, "optim.eps", 1e-8))),
        weight_decay_(
            keel::sdk::arg_double(args, "weight_decay", keel::sdk::arg_double(args, "optim.weight_decay", 0.1))) {
    keel::sdk::require_known_args(args, {"beta1", "beta2", "eps", "weight_decay"});
    if (!(beta1_ >= 0 && beta1_ < 1 && beta2_ >= 0 && beta2_ < 1 && eps_ > 0 && weight_decay_ >= 0))
      throw std::invalid_argument("adamw: need 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0");
  }

  void bind(std::vector<keel::sdk::Param> params) override {
    params_ = std::move(params);
    exp_avg_.clear();
    exp_avg_sq_.clear();
    for (const auto& p : params_) {
      exp_avg_.push_back(at::zeros_like(p.param));  // [same shape as the param], fp32
      exp_avg_sq_.push_back(at::zeros_like(p.param));
    }
  }

  void step(const keel::sdk::StepContext& ctx) override {
    ++step_;
    const double lr = ctx.lr;
    if (ctx.kernels != nullptr && ctx.kernels->adamw_step != nullptr && !params_.empty() &&
        params_.front().param.is_cuda()) {
      step_fused(*ctx.kernels, lr);
      return;
    }
    // The CPU path (and that of a host without fused kernels): one tensor at a time. Keel's fused kernel's
    // reference (kernels/optimizer_step.cpp) is this loop, op for op.
    const double bias_correction1 = 1.0 - std::pow(beta1_, static_cast<double>(step_));
    const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2_, static_cast<double>(step_)));
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor param = params_[i].param;
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      const double param_lr = lr * params_[i].lr_scale;  // lr_scale: 1, or μP's per-layer factor
      if (params_[i].decay && weight_decay_ != 0.0) param.mul_(1.0 - param_lr * weight_decay_);
      exp_avg_[i].lerp_(grad, 1.0 - beta1_);
      exp_avg_sq_[i].mul_(beta2_).addcmul_(grad, grad, 1.0 - beta2_);
      at::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(eps_);
      param.addcdiv_(exp_avg_[i], denom, -(param_lr / bias_correction1));
    }
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json = "{\"step\": " + std::to_string(step_) + "}";
    for (size_t i = 0; i < params_.size(); ++i) {
      state.tensors.emplace_back(params_[i].name + "/exp_avg", exp_avg_[i]);
      state.tensors.emplace_back(params_[i].name + "/exp_avg_sq", exp_avg_sq_[i]);
    }
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    step_ = keel::sdk::json_int(state.json, "step", 0);
    for (size_t i = 0; i < params_.size(); ++i) {
      exp_avg_[i].copy_(keel::sdk::tensor_named(state.tensors, params_[i].name + "/exp_avg", params_[i].param));
      exp_avg_sq_[i].copy_(keel::sdk::tensor_named(state.tensors, params_[i].name + "/exp_avg_sq", params_[i].param));
    }
  }

  std::vector<std::string> adopt_state(const keel::sdk::NamedTensors& previous) override {
    std::vector<std::string> report;
    size_t adopted_m = 0, adopted_v = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (const at::Tensor* m = keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg", params_[i].param)) {
        exp_avg_[i].copy_(*m);
        ++adopted_m;
      }
      if (const at::Tensor* v = keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg_sq", params_[i].param)) {
        exp_avg_sq_[i].copy_(*v);
        ++adopted_v;
      }
    }
    report.push_back("adamw: adopted exp_avg of " + std::to_string(adopted_m) + "/" + std::to_string(params_.size()) +
                     " tensors (the rest start at zero)");
    report.push_back("adamw: adopted exp_avg_sq of " + std::to_string(adopted_v) + "/" +
                     std::to_string(params_.size()) +
                     " tensors (the rest start at zero); bias-correction step count starts at 0");
    return report;
  }

  void reset_moments() override {
    for (auto& m : exp_avg_) m.zero_();
    for (auto& v : exp_avg_sq_) v.zero_();
    step_ = 0;
  }

 private:
  // The same update through the host's multi-tensor kernel: every param with a gradient and the same lr_scale in
  // one call (one call in all unless μP gives hidden matrices their own LR).
  void step_fused(const keel::sdk::HostKernels& kernels, double lr) {
    for (const auto& group : keel::plugins::lr_groups(params_, keel::plugins::with_grad(params_))) {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
      std::vector<bool> decay;
      for (const size_t i : group.indices) {
        params.push_back(params_[i].param);
        grads.push_back(params_[i].param.grad());
        exp_avgs.push_back(exp_avg_[i]);
        exp_avg_sqs.push_back(exp_avg_sq_[i]);
        decay.push_back(params_[i].decay);
      }
      keel::sdk::AdamWHyper hyper;
      hyper.lr = lr * group.lr_scale;
      hyper.beta1 = beta1_;
      hyper.beta2 = beta2_;
      hyper.eps = eps_;
      hyper.weight_decay = weight_decay_;
      hyper.step = step_;
      kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
    }
  }

  double beta1_, beta2_, eps_, weight_decay_;
  std::vector<keel::sdk::Param> params_;
  std::vector<at::Tensor> exp_avg_;
  std::vector<at::Tensor> exp_avg_sq_;
  int64_t step_ = 0;
};

}  // namespace

KEEL_PLUGIN(AdamW, "adamw", "1.0", keel::sdk::kOptimizer,
            "AdamW (torch.optim.AdamW update rule) on fp32 master weights")

// Why: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as a swap-in for AdamW, e.g.
// from a checkpoint of a run that spikes under AdamW. One moment instead of two, and an update of the same size
// in every coordinate (a sign), so one bad gradient cannot blow up a step. Per parameter, with lr = ctx.lr:
//   update = sign(beta1 * m + (1 - beta1) * g)
//   p      = p * (1 - lr * weight_decay)        (decoupled; only for params with decay = true)
//   p      = p - lr * update
//   m      = beta2 * m + (1 - beta2) * g
// (the order of the reference implementation, lucidrains/lion-pytorch; sign(0) = 0). The paper advises a 3-10x
// smaller LR and a 3-10x larger weight decay than AdamW's: set optim.lr / plugin.lion.weight_decay accordingly.
// Its momentum is saved as "<param>/exp_avg", the name AdamW gives its first moment, so a swap AdamW -> Lion
// adopts it by name (adopt_state); AdamW's exp_avg_sq has no counterpart and is dropped (said so in the lines
// adopt_state returns).
// Arguments: beta1 (0.9), beta2 (0.99), weight_decay (optim.weight_decay, else 0.1).
// On a GPU the step goes through the host's multi-tensor kernel (StepContext::kernels) when Keel provides one.
#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

#include "../common/lr_groups.h"
#include "keel/plugin.h"

namespace {

class Lion : public keel::sdk::Plugin {
 public:
  explicit Lion(const keel::sdk::Args& args) : options_(parse_options(args)) {}

  void bind(std::vector<keel::sdk::Param> params) override {
    params_ = std::move(params);
    exp_avg_.clear();
    for (const auto& p : params_) exp_avg_.push_back(at::zeros_like(p.param));  // [same shape as the param], fp32
  }

  void step(const keel::sdk::StepContext& ctx) override {
    const double lr = ctx.lr;
    if (ctx.kernels != nullptr && ctx.kernels->lion_step != nullptr && !params_.empty() &&
        params_.front().param.is_cuda()) {
      step_fused(*ctx.kernels, lr);
      return;
    }
    // The CPU path (and that of a host without fused kernels): one tensor at a time. Keel's fused kernel's
    // reference (kernels/optimizer_step.cpp) is this loop, op for op.
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor param = params_[i].param;
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      // [param shape], each in {-1, 0, 1}
      at::Tensor update = exp_avg_[i].mul(options_.beta1).add_(grad, 1.0 - options_.beta1).sign_();
      const double param_lr = lr * params_[i].lr_scale;  // lr_scale: 1, or μP's per-layer factor
      if (params_[i].decay && options_.weight_decay != 0.0) param.mul_(1.0 - param_lr * options_.weight_decay);
      param.add_(update, -param_lr);
      exp_avg_[i].mul_(options_.beta2).add_(grad, 1.0 - options_.beta2);
    }
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    for (size_t i = 0; i < params_.size(); ++i) state.tensors.emplace_back(params_[i].name + "/exp_avg", exp_avg_[i]);
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    for (size_t i = 0; i < params_.size(); ++i) {
      exp_avg_[i].copy_(keel::sdk::tensor_named(state.tensors, params_[i].name + "/exp_avg", params_[i].param));
    }
  }

  std::vector<std::string> adopt_state(const keel::sdk::NamedTensors& previous) override {
    size_t adopted = 0, second_moments = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (const at::Tensor* m = keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg", params_[i].param)) {
        exp_avg_[i].copy_(*m);
        ++adopted;
      }
      if (keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg_sq", params_[i].param)) ++second_moments;
    }
    const std::string total = std::to_string(params_.size());
    return {"lion: adopted exp_avg of " + std::to_string(adopted) + "/" + total +
                " tensors as its momentum (the rest start at zero)",
            "lion: exp_avg_sq is not used (Lion keeps one moment); the previous optimizer's exp_avg_sq of " +
                std::to_string(second_moments) + "/" + total + " tensors is dropped"};
  }

  void reset_moments() override {
    for (auto& m : exp_avg_) m.zero_();
  }

 private:
  // The same update through the host's multi-tensor kernel: every param with a gradient and the same lr_scale in
  // one call (one call in all unless μP gives hidden matrices their own LR).
  void step_fused(const keel::sdk::HostKernels& kernels, double lr) {
    for (const auto& group : keel::plugins::lr_groups(params_, keel::plugins::with_grad(params_))) {
      std::vector<at::Tensor> params, grads, exp_avgs;
      std::vector<bool> decay;
      for (const size_t i : group.indices) {
        params.push_back(params_[i].param);
        grads.push_back(params_[i].param.grad());
        exp_avgs.push_back(exp_avg_[i]);
        decay.push_back(params_[i].decay);
      }
      keel::sdk::LionHyper hyper;
      hyper.lr = lr * group.lr_scale;
      hyper.beta1 = options_.beta1;
      hyper.beta2 = options_.beta2;
      hyper.weight_decay = options_.weight_decay;
      kernels.lion_step(params, grads, exp_avgs, decay, hyper);
    }
  }

  struct Options {
    double beta1, beta2, weight_decay;
  };
  static Options parse_options(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"beta1", "beta2", "weight_decay"});
    Options o;
    o.beta1 = keel::sdk::arg_double(args, "beta1", 0.9);
    o.beta2 = keel::sdk::arg_double(args, "beta2", 0.99);
    o.weight_decay =
        keel::sdk::arg_double(args, "weight_decay", keel::sdk::arg_double(args, "optim.weight_decay", 0.1));
    if (!(o.beta1 >= 0 && o.beta1 < 1)) throw std::invalid_argument("lion: argument 'beta1' must be in [0, 1)");
    if (!(o.beta2 >= 0 && o.beta2 < 1)) throw std::invalid_argument("lion: argument 'beta2' must be in [0, 1)");
    if (!(o.weight_decay >= 0)) throw std::invalid_argument("lion: argument 'weight_decay' must be >= 0");
    return o;
  }

  Options options_;
  std::vector<keel::sdk::Param> params_;
  std::vector<at::Tensor> exp_avg_;  // the momentum m, one per param
};

}  // namespace

KEEL_PLUGIN(Lion, "lion", "1.0", keel::sdk::kOptimizer,
            "Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay; adopts AdamW's exp_avg")

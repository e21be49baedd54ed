// Why: Muon (Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; scaled up in
// Moonshot's "Muon is Scalable for LLM Training", 2025) trains the hidden matrices of a transformer with
// orthogonalised momentum, and is a candidate remedy for runs whose Adam second moments misbehave. Per step, with
// lr = ctx.lr:
//   hidden 2-D matrices (every 2-D param whose name matches no glob of `exclude`), W of shape [rows, cols]:
//     W   = W * (1 - lr_m * weight_decay)                  (decoupled; only for params with decay = true)
//     m   = lerp(m, g, 1 - momentum)                        (an EMA of the gradient, as Adam's first moment)
//     u   = nesterov ? lerp(g, m, momentum) : m
//     O   = NewtonSchulz5(u)                                (below; fp32)
//     W   = W - lr_m * s * O,   lr_m = lr * lr_ratio * lr_scale (the param's; 1 unless μP)
//     s   = 0.2 * sqrt(max(rows, cols)) for scale = rms (Moonshot: O's RMS becomes 0.2, about AdamW's, so optim.lr
//           and optim.weight_decay carry over), or sqrt(max(1, rows / cols)) for scale = shape (Keller Jordan's
//           reference; pair it with lr_ratio = 0.02 / optim.lr to get Muon's usual LR);
//   everything else (embeddings, the output head, norm weights, any 1-D param): AdamW exactly as plugins/adamw
//   (the same ops in the same order, with the param's lr_scale, and the host's fused kernel on a GPU), with beta1,
//   beta2, eps, weight_decay.
// NewtonSchulz5 is the quintic iteration of the reference, 5 steps by default (ns_steps):
//   X = u (transposed if rows > cols);  X = X / (||X||_F + 1e-7)
//   repeat ns_steps times:  A = X X^T;  B = b A + c A A;  X = a X + B X,  (a, b, c) = (3.4445, -4.7750, 2.0315)
// It runs in fp32 (the reference uses bf16 on a GPU) and is deterministic: the same inputs give the same bits.
// State: "<param>/exp_avg" for every param (Muon's momentum m for the matrices: the name AdamW gives its first
// moment, so a swap AdamW <-> Muon adopts it by name, and moment surgery scales it), "<param>/exp_avg_sq" for the
// AdamW params, and {"step": N} (the AdamW bias correction's count of updates).
// Tensor parallelism: each rank orthogonalises the shard it holds (column-parallel weights split by rows,
// row-parallel ones by columns; `scale` uses the shard's shape), which approximates orthogonalising the whole
// matrix: exact at tp = 1, per shard otherwise (docs/plugins.md). ZeRO-1 gives each DP rank whole tensors: exact.
// Arguments: momentum (0.95), nesterov (true), ns_steps (5), lr_ratio (1.0), scale (rms | shape),
// exclude (embed.*,head.*), beta1, beta2, eps, weight_decay (the optim.* keys, as adamw).
#include <ATen/ATen.h>
#include <fnmatch.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/lr_groups.h"
#include "keel/plugin.h"

namespace {

using keel::sdk::Args;

struct Options {
  double momentum, lr_ratio, beta1, beta2, eps, weight_decay;
  bool nesterov;
  int64_t ns_steps;
  bool rms_scale;
  std::vector<std::string> exclude;
};

[[noreturn]] void refuse(const std::string& why) { throw std::invalid_argument("muon: " + why); }

std::vector<std::string> split_globs(const std::string& list) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin < list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    std::string glob = list.substr(begin, end - begin);
    while (!glob.empty() && glob.front() == ' ') glob.erase(glob.begin());
    while (!glob.empty() && glob.back() == ' ') glob.pop_back();
    if (!glob.empty()) out.push_back(glob);
    begin = end + 1;
  }
  return out;
}

Options parse_options(const Args& args) {
  keel::sdk::require_known_args(args, {"momentum", "nesterov", "ns_steps", "lr_ratio", "scale", "exclude", "beta1",
                                       "beta2", "eps", "weight_decay"});
  Options o;
  o.momentum = keel::sdk::arg_double(args, "momentum", 0.95);
  o.nesterov = keel::sdk::arg_bool(args, "nesterov", true);
  o.ns_steps = keel::sdk::arg_int(args, "ns_steps", 5);
  o.lr_ratio = keel::sdk::arg_double(args, "lr_ratio", 1.0);
  const std::string scale = keel::sdk::arg_string(args, "scale", "rms");
  o.exclude = split_globs(keel::sdk::arg_string(args, "exclude", "embed.*,head.*"));
  o.beta1 = keel::sdk::arg_double(args, "beta1", keel::sdk::arg_double(args, "optim.beta1", 0.9));
  o.beta2 = keel::sdk::arg_double(args, "beta2", keel::sdk::arg_double(args, "optim.beta2", 0.95));
  o.eps = keel::sdk::arg_double(args, "eps", keel::sdk::arg_double(args, "optim.eps", 1e-8));
  o.weight_decay = keel::sdk::arg_double(args, "weight_decay", keel::sdk::arg_double(args, "optim.weight_decay", 0.1));
  if (!(o.momentum >= 0 && o.momentum < 1)) refuse("argument 'momentum' must be in [0, 1)");
  if (o.ns_steps < 1 || o.ns_steps > 100) refuse("argument 'ns_steps' must be in [1, 100]");
  if (!(o.lr_ratio > 0) || !std::isfinite(o.lr_ratio)) refuse("argument 'lr_ratio' must be a finite number > 0");
  if (scale != "rms" && scale != "shape") refuse("argument 'scale' must be rms or shape, got '" + scale + "'");
  o.rms_scale = scale == "rms";
  if (!(o.beta1 >= 0 && o.beta1 < 1)) refuse("argument 'beta1' must be in [0, 1)");
  if (!(o.beta2 >= 0 && o.beta2 < 1)) refuse("argument 'beta2' must be in [0, 1)");
  if (!(o.eps > 0) || !std::isfinite(o.eps)) refuse("argument 'eps' must be a finite number > 0");
  if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) refuse("argument 'weight_decay' must be >= 0");
  return o;
}

// The quintic Newton-Schulz iteration of the reference implementation: an approximate U V^T of g = U S V^T.
at::Tensor newton_schulz5(const at::Tensor& g, int64_t steps) {
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const bool tall = g.size(0) > g.size(1);
  at::Tensor x = tall ? g.t() : g;  // [r, k], r <= k
  x = x.div(x.norm().add(1e-7));    // spectral norm <= Frobenius norm <= 1
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor A = at::mm(x, x.t());                 // [r, r]
    const at::Tensor B = at::mm(A, A).mul_(c).add_(A, b);  // b A + c A A
    x = at::addmm(x, B, x, /*beta=*/a, /*alpha=*/1.0);     // a X + B X
  }
  return tall ? x.t() : x;  // [rows, cols]
}

class Muon : public keel::sdk::Plugin {
 public:
  explicit Muon(const Args& args) : o_(parse_options(args)) {}

  void bind(std::vector<keel::sdk::Param> params) override {
    params_ = std::move(params);
    exp_avg_.clear();
    exp_avg_sq_.clear();
    is_matrix_.clear();
    for (const auto& p : params_) {
      bool matrix = p.param.dim() == 2;
      for (const auto& glob : o_.exclude) matrix = matrix && ::fnmatch(glob.c_str(), p.name.c_str(), 0) != 0;
      is_matrix_.push_back(matrix);
      exp_avg_.push_back(at::zeros_like(p.param));  // [param shape], fp32
      exp_avg_sq_.push_back(matrix ? at::Tensor() : at::zeros_like(p.param));
    }
  }

  void step(const keel::sdk::StepContext& ctx) override {
    ++step_;
    adamw_step(ctx);
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!is_matrix_[i]) continue;
      at::Tensor param = params_[i].param;
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      const double lr = ctx.lr * o_.lr_ratio * params_[i].lr_scale;
      if (params_[i].decay && o_.weight_decay != 0.0) param.mul_(1.0 - lr * o_.weight_decay);
      exp_avg_[i].lerp_(grad, 1.0 - o_.momentum);
      const at::Tensor update = o_.nesterov ? grad.lerp(exp_avg_[i], o_.momentum) : exp_avg_[i];  // [rows, cols]
      const double rows = static_cast<double>(param.size(0)), cols = static_cast<double>(param.size(1));
      const double scale = o_.rms_scale ? 0.2 * std::sqrt(std::max(rows, cols)) : std::sqrt(std::max(1.0, rows / cols));
      param.add_(newton_schulz5(update, o_.ns_steps), -lr * scale);
    }
  }

  keel::sdk::PluginState save_state() const override {
    keel::sdk::PluginState state;
    state.json = "{\"step\": " + std::to_string(step_) + "}";
    for (size_t i = 0; i < params_.size(); ++i) {
      state.tensors.emplace_back(params_[i].name + "/exp_avg", exp_avg_[i]);
      if (!is_matrix_[i]) state.tensors.emplace_back(params_[i].name + "/exp_avg_sq", exp_avg_sq_[i]);
    }
    return state;
  }

  void load_state(const keel::sdk::PluginState& state) override {
    step_ = keel::sdk::json_int(state.json, "step", 0);
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& like = params_[i].param;
      exp_avg_[i].copy_(keel::sdk::tensor_named(state.tensors, params_[i].name + "/exp_avg", like));
      if (!is_matrix_[i])
        exp_avg_sq_[i].copy_(keel::sdk::tensor_named(state.tensors, params_[i].name + "/exp_avg_sq", like));
    }
  }

  std::vector<std::string> adopt_state(const keel::sdk::NamedTensors& previous) override {
    size_t matrices = 0, momenta = 0, others = 0, firsts = 0, seconds = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& like = params_[i].param;
      const at::Tensor* m = keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg", like);
      if (is_matrix_[i]) {
        ++matrices;
        if (m != nullptr) {
          exp_avg_[i].copy_(*m);
          ++momenta;
        }
        continue;
      }
      ++others;
      if (m != nullptr) {
        exp_avg_[i].copy_(*m);
        ++firsts;
      }
      if (const at::Tensor* v = keel::sdk::find_tensor(previous, params_[i].name + "/exp_avg_sq", like)) {
        exp_avg_sq_[i].copy_(*v);
        ++seconds;
      }
    }
    return {"muon: adopted exp_avg of " + std::to_string(momenta) + "/" + std::to_string(matrices) +
                " hidden matrices as their momentum (the rest start at zero; their exp_avg_sq is not used)",
            "muon: adopted exp_avg of " + std::to_string(firsts) + "/" + std::to_string(others) +
                " and exp_avg_sq of " + std::to_string(seconds) + "/" + std::to_string(others) +
                " AdamW-updated tensors (the rest start at zero); bias-correction step count starts at 0"};
  }

  void reset_moments() override {
    for (auto& m : exp_avg_) m.zero_();
    for (auto& v : exp_avg_sq_)
      if (v.defined()) v.zero_();
    step_ = 0;
  }

 private:
  // AdamW for every param that is not a hidden matrix: plugins/adamw's loop op for op, or the host's kernel (one
  // call per distinct lr_scale).
  void adamw_step(const keel::sdk::StepContext& ctx) {
    const double lr = ctx.lr;
    std::vector<size_t> adam;
    for (size_t i = 0; i < params_.size(); ++i)
      if (!is_matrix_[i] && params_[i].param.grad().defined()) adam.push_back(i);
    if (adam.empty()) return;
    if (ctx.kernels != nullptr && ctx.kernels->adamw_step != nullptr && params_[adam.front()].param.is_cuda()) {
      for (const auto& group : keel::plugins::lr_groups(params_, adam)) {
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
        hyper.beta1 = o_.beta1;
        hyper.beta2 = o_.beta2;
        hyper.eps = o_.eps;
        hyper.weight_decay = o_.weight_decay;
        hyper.step = step_;
        ctx.kernels->adamw_step(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
      }
      return;
    }
    const double bias_correction1 = 1.0 - std::pow(o_.beta1, static_cast<double>(step_));
    const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(o_.beta2, static_cast<double>(step_)));
    for (size_t i : adam) {
      at::Tensor param = params_[i].param;
      const at::Tensor& grad = param.grad();
      const double param_lr = lr * params_[i].lr_scale;
      if (params_[i].decay && o_.weight_decay != 0.0) param.mul_(1.0 - param_lr * o_.weight_decay);
      exp_avg_[i].lerp_(grad, 1.0 - o_.beta1);
      exp_avg_sq_[i].mul_(o_.beta2).addcmul_(grad, grad, 1.0 - o_.beta2);
      at::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(o_.eps);
      param.addcdiv_(exp_avg_[i], denom, -(param_lr / bias_correction1));
    }
  }

  Options o_;
  std::vector<keel::sdk::Param> params_;
  std::vector<bool> is_matrix_;         // per param: updated by Muon (else AdamW)
  std::vector<at::Tensor> exp_avg_;     // Muon's momentum (matrices) or Adam's first moment
  std::vector<at::Tensor> exp_avg_sq_;  // Adam's second moment (undefined for the matrices)
  int64_t step_ = 0;
};

}  // namespace

KEEL_PLUGIN(Muon, "muon", "1.0", keel::sdk::kOptimizer,
            "Muon: Newton-Schulz orthogonalised Nesterov momentum for hidden matrices, AdamW for the rest")

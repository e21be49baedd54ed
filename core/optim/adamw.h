// Why: Keel's own AdamW over named fp32 master parameters, so that every piece of optimizer state has a stable
// name (`<param>/exp_avg`, `<param>/exp_avg_sq`, `step`) for complete checkpoints and for optimizer swaps that
// adopt state by name. Update rule identical to torch.optim.AdamW (decoupled weight decay, bias correction).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace keel::optim {

struct NamedParameter {
  std::string name;
  at::Tensor param;  // fp32 master weight (requires grad; its .grad() is the fp32 gradient)
  bool decay;        // weight decay applies (matrices: true; norm weights/biases: false)
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  AdamW(std::vector<NamedParameter> params, AdamWOptions options);
  // One update with learning rate `lr` from the gradients currently in each param's .grad().
  void step(double lr);
  int64_t step_count() const { return step_; }
  const std::vector<NamedParameter>& params() const { return params_; }
  // Named state tensors ("<param>/exp_avg", "<param>/exp_avg_sq") plus the step count.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;
  void load_state_tensors(const std::vector<std::pair<std::string, at::Tensor>>& named, int64_t step_count);

 private:
  std::vector<NamedParameter> params_;
  AdamWOptions options_;
  std::vector<at::Tensor> exp_avg_;     // per param, fp32, same shape
  std::vector<at::Tensor> exp_avg_sq_;  // per param, fp32, same shape
  int64_t step_ = 0;
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

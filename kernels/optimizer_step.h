// Why: the AdamW and Lion updates over all of a model's fp32 master weights at once. On CUDA tensors they run the
// multi-tensor kernels of kernels/cuda/optimizer_step.cu (one launch for ~36-48 tensors instead of ~5 per
// tensor); everywhere else the reference, which is the LibTorch op sequence of plugins/adamw and plugins/lion
// (bit for bit the same on CPU). kernels/ knows nothing of plugins or the SDK: optimizer plugins (which do not
// link keel_core) reach these functions through the SDK's table, sdk::HostKernels, which the host side builds
// from them (core/plugin_host/host_kernels.h) and hands to plugins as StepContext::kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace keel::kernels {

// The scalars of one update (the same fields and defaults as the SDK's sdk::AdamWHyper / sdk::LionHyper).
struct AdamWHyper {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based count of updates so far, including this one (bias correction)
};
struct LionHyper {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.99, weight_decay = 0.0;
};

// params, grads, exp_avgs, exp_avg_sqs: parallel lists, entry i of each the same shape, fp32, on one device;
// decay[i]: weight decay applies to params[i]. Updates params and the moments in place (run under no-grad).
// Throws, naming the argument, on lists of different lengths, a shape/dtype/device mismatch, or hyper.step < 1.
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<bool>& decay, const AdamWHyper& hyper);
void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay, const LionHyper& hyper);

// The references: one tensor at a time with LibTorch ops, on any device (what the functions above run when the
// fused kernel is not taken, and what the kernel tests compare against). Same arguments and checks.
void adamw_step_reference(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const std::vector<bool>& decay, const AdamWHyper& hyper);
void lion_step_reference(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay,
                         const LionHyper& hyper);

}  // namespace keel::kernels

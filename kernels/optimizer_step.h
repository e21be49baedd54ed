// Why: the AdamW and Lion updates over all of a model's fp32 master weights at once. On CUDA tensors they run the
// multi-tensor kernels of kernels/cuda/optimizer_step.cu (one launch for ~36-48 tensors instead of ~5 per
// tensor); everywhere else the reference, which is the LibTorch op sequence of plugins/adamw and plugins/lion
// (bit for bit the same on CPU). Optimizer plugins do not link keel_core, so they reach these functions through
// the table host_kernels() returns, which Keel hands them as StepContext::kernels (sdk/include/keel/plugin.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "keel/plugin.h"

namespace keel::kernels {

using AdamWHyper = sdk::AdamWHyper;
using LionHyper = sdk::LionHyper;

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

// {adamw_step, lion_step}: what the trainer puts in StepContext::kernels. Lives as long as the program.
const sdk::HostKernels* host_kernels();

}  // namespace keel::kernels

// Why: an optimizer step over a few hundred fp32 master weights is a few hundred tiny element-wise loops; as
// LibTorch ops it is ~5 kernel launches per tensor. These launchers update every tensor in one launch (or a
// few), after PyTorch's multi_tensor_apply: the tensors' pointers and sizes and a block -> (tensor, chunk) table
// travel in the kernel's argument struct. Torch-free: raw fp32 pointers, sizes, a stream; hyper-parameters are
// host scalars passed by value, so nothing waits on the device.
#pragma once

#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

// Tensor i is params[i][0 .. sizes[i]) (and likewise for the others), contiguous fp32 on the current device.
// decay_factors[i] multiplies param i before the update: 1 - lr * weight_decay, or 1 without decay.

// AdamW (torch.optim.AdamW):  p *= decay_factor;  m += (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2;
// p += -step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
// Each scalar is computed in double on the host and rounded once to fp32, as LibTorch does with a Scalar.
struct AdamWScalars {
  float one_minus_beta1, beta2, one_minus_beta2, eps;
  float neg_step_size;          // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};
void adamw_step(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
                const int64_t* sizes, const float* decay_factors, int64_t tensors, const AdamWScalars& scalars,
                cudaStream_t stream);

// Lion (Chen et al. 2023):  u = sign(beta1 m + (1 - beta1) g);  p *= decay_factor;  p -= lr u;
// m = beta2 m + (1 - beta2) g
struct LionScalars {
  float neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
};
void lion_step(float* const* params, const float* const* grads, float* const* exp_avgs, const int64_t* sizes,
               const float* decay_factors, int64_t tensors, const LionScalars& scalars, cudaStream_t stream);

}  // namespace keel::kernels::cuda

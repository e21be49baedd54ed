// Why: RMSNorm (the model's pre-norms, final norm and QK-norm) as one op with a fused CUDA kernel and, beside it,
// the LibTorch reference it is tested against. The forward is exactly the reference branch of
// core/model/ops.cpp's rms_norm (what NormImpl "rmsnorm" calls): statistics in fp32, master weight fp32, result in
// x's dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace keel::kernels {

// x: [..., C] (bf16, fp16, fp32; fp64 for tests), weight: [C] fp32 (fp64 when x is fp64), same device.
// y = (x_f * rsqrt(mean(x_f^2, -1) + eps) * weight).to(x.dtype), x_f = x in fp32 (fp64 for fp64 x). Returns
// [..., C] in x's dtype. Differentiable w.r.t. x (gradient in x's dtype) and weight (fp32). Runs
// kernels/cuda/rms_norm.cu when use_fused(x) and x is bf16/fp16/fp32, else the reference below.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// The forward above in LibTorch ops, on any device (differentiable by LibTorch autograd).
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps);

struct RmsNormGrads {
  at::Tensor x;       // [..., C] x's dtype
  at::Tensor weight;  // [C] weight's dtype
};

// The backward written out, in LibTorch ops: with r = rsqrt(mean(x^2) + eps), xhat = x * r, gw = grad_y * weight:
//   grad_x = r * (gw - xhat * mean(gw * xhat, -1)),  grad_weight = sum over all leading dims of grad_y * xhat.
RmsNormGrads rms_norm_backward_reference(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         double eps);

}  // namespace keel::kernels

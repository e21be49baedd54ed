// Why: rotary position embedding (RoPE, rotate-half convention as HF LLaMA/NeoX, partial rotary allowed) as one
// op with a fused CUDA kernel and, beside it, the LibTorch reference it is tested against. The reference is
// exactly core/model/ops.cpp's apply_rotary, with the tables of make_rotary_tables passed in as tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace keel::kernels {

// x: [B, T, H, D] (bf16, fp16, fp32; fp64 for tests), any strides. cos, sin: [T_max >= T, rotary_dims/2] fp32
// tables, constants (no gradient); rows [0, T) are used, moved to x's device if needed. rotary_dims: even, in
// [0, D]. With x1 = x[..., :R/2], x2 = x[..., R/2:R] (R = rotary_dims), in fp32:
//   out[..., :R] = [x1*cos - x2*sin, x2*cos + x1*sin],  out[..., R:] = x[..., R:]
// in x's dtype. rotary_dims == 0 returns x itself. Differentiable w.r.t. x (the inverse rotation of the
// gradient). Runs kernels/cuda/rotary.cu when use_fused(x) and x is bf16/fp16/fp32, else the reference below.
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dims);

// The forward above in LibTorch ops, on any device (differentiable by LibTorch autograd).
at::Tensor apply_rotary_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  int64_t rotary_dims);

// The backward written out: the reference forward applied to grad with sin -> -sin (rotation by the opposite
// angle); the pass-through dims pass the gradient unchanged. Returns [B, T, H, D] in grad's dtype.
at::Tensor apply_rotary_backward_reference(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t rotary_dims);

}  // namespace keel::kernels

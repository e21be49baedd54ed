// Why: the SwiGLU gate of the MLP, silu(gate) * up, as one op with a fused CUDA kernel (one pass forward, one pass
// backward, nothing but the inputs saved) and, beside it, the LibTorch reference it is tested against. The
// reference is exactly core/model/ops.cpp's swiglu expression.
#pragma once

#include <ATen/core/Tensor.h>

namespace keel::kernels {

// gate, up: the same shape, dtype (floating) and device. Returns silu(gate) * up in that shape and dtype.
// Differentiable w.r.t. both. Runs kernels/cuda/swiglu.cu (fp32 arithmetic, one rounding to the dtype) when
// use_fused(gate) and the dtype is bf16/fp16/fp32, else the reference below.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

// silu(gate) * up in LibTorch ops (as the model writes it), on any device.
at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up);

struct SwiGluGrads {
  at::Tensor gate;  // like gate
  at::Tensor up;    // like up
};

// The backward written out, in fp32 (fp64 for fp64 inputs), stored in the inputs' dtype. With s = sigmoid(gate):
//   grad_gate = grad * up * s * (1 + gate * (1 - s)),  grad_up = grad * gate * s  (= grad * silu(gate)).
SwiGluGrads swiglu_backward_reference(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up);

}  // namespace keel::kernels

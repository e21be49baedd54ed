// Why: the fused SwiGLU launchers, torch-free (raw pointers, an element count, a stream); kernels/swiglu.cpp is
// the only caller. out = silu(gate) * up elementwise, arithmetic in fp32, stored in the inputs' element type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

// gate, up, out: n contiguous elements of type `dtype`.
void swiglu_forward(const void* gate, const void* up, void* out, int64_t n, DType dtype, cudaStream_t stream);

// grad_out, gate, up, grad_gate (out), grad_up (out): n contiguous elements of type `dtype`. With s = sigmoid(gate):
// grad_gate = grad_out * up * s * (1 + gate * (1 - s)), grad_up = grad_out * gate * s.
void swiglu_backward(const void* grad_out, const void* gate, const void* up, void* grad_gate, void* grad_up, int64_t n,
                     DType dtype, cudaStream_t stream);

}  // namespace keel::kernels::cuda

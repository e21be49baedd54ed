// Why: the fused RMSNorm launchers, torch-free (raw pointers, sizes, a stream), so nvcc builds them on any machine
// and kernels/rms_norm.cpp is the only caller. Semantics: y = x * rstd * weight with rstd = rsqrt(mean(x^2) + eps)
// per row, all arithmetic in fp32, y stored in x's element type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

// x, y: [rows, C] contiguous, element type `dtype`; weight: [C] fp32; rstd (out): [rows] fp32, kept for backward.
void rms_norm_forward(const void* x, const float* weight, void* y, float* rstd, int64_t rows, int64_t C, float eps,
                      DType dtype, cudaStream_t stream);

// Rows of the fp32 workspace [partials, C] that rms_norm_backward needs for its deterministic grad_weight sum
// (one row of per-column partial sums per block; depends on the current device's SM count).
int64_t rms_norm_backward_partials(int64_t rows, int64_t C);

// grad_y, x, grad_x: [rows, C] contiguous, element type `dtype`; weight: [C] fp32; rstd: [rows] fp32 from forward;
// grad_weight (out): [C] fp32; workspace: [partials, C] fp32 with partials = rms_norm_backward_partials(rows, C).
// grad_x = rstd * (g*w - xhat * mean(g*w*xhat)), xhat = x*rstd; grad_weight = sum over rows of g*xhat, summed
// in a fixed order (no float atomics), so repeated calls give identical bits.
void rms_norm_backward(const void* grad_y, const void* x, const float* weight, const float* rstd, void* grad_x,
                       float* grad_weight, float* workspace, int64_t partials, int64_t rows, int64_t C, DType dtype,
                       cudaStream_t stream);

}  // namespace keel::kernels::cuda

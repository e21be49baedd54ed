// Why: the fused rotary-embedding launcher, torch-free; kernels/rotary.cpp is the only caller. One launcher serves
// forward and backward: the backward of a rotation is the rotation by the opposite angle (sin -> -sin).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

// x, out: [B, T, H, D] contiguous, element type `dtype`. cos, sin: [>= T, rotary_dims/2] fp32, contiguous (row t
// is position t). For each (b, t, h) and i < R/2 (R = rotary_dims, even, 0 < R <= D), with x1 = x[i], x2 = x[i+R/2]:
//   out[i] = x1*cos[t,i] - x2*s,  out[i+R/2] = x2*cos[t,i] + x1*s,  s = sin_sign * sin[t,i]
// in fp32; out[R:] = x[R:]. sin_sign is +1 for the forward and -1 for the backward (applied to the gradient).
void rotary_apply(const void* x, const float* cos, const float* sin, void* out, int64_t B, int64_t T, int64_t H,
                  int64_t D, int64_t rotary_dims, float sin_sign, DType dtype, cudaStream_t stream);

}  // namespace keel::kernels::cuda

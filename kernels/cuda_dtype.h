// Why: the one mapping from LibTorch's dtypes to the torch-free launchers' (kernels/cuda/launch.cuh), shared by
// every op's CUDA branch. Included only under KEEL_WITH_CUDA.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels {

// The dtypes the kernels are written for: fp32, bf16, fp16 (other inputs take the LibTorch reference).
inline bool has_kernel_for(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline cuda::DType cuda_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", t);
  }
}

}  // namespace keel::kernels

// Why: the fused ops read bf16/fp16/fp32 and do all arithmetic in fp32; these few helpers are that conversion
// in one place (round-to-nearest-even on the way back, as at::Tensor::to does), plus the switch from the runtime
// DType onto a template parameter, so each launcher names its kernel once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Calls f(T{}) with T the element type `dtype` names: f is a generic lambda that launches kernel<T>.
template <typename F>
inline void with_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      return;
    case DType::kFloat16:
      f(__half{});
      return;
  }
  throw std::invalid_argument("keel kernels: unknown DType " + std::to_string(static_cast<int>(dtype)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace keel::kernels::cuda

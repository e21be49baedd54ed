// Why: RoPE unfused is a narrow, an fp32 copy, four multiplies, two concatenations and a cast back, each a pass
// over [B, T, H, D]; fused it is one read and one write per element. The angles stay in fp32 tables computed once
// (core/model/llama.cpp make_rotary_tables; CrystalCoder found lower precision there hurt training).
//
// One thread per work item of a row (b, t, h): items [0, R/2) rotate the pair (i, i + R/2), items [R/2, R/2 + D-R)
// copy one pass-through element. Consecutive threads take consecutive items, so loads coalesce within a row.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cuda/float_io.cuh"
#include "kernels/cuda/rotary.cuh"

namespace keel::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loop covers the rest

template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ out, int64_t rows, int64_t T_len, int64_t H, int64_t D, int64_t half,
                              float sin_sign) {
  const int64_t items_per_row = D - half;  // half pairs + (D - 2*half) pass-through elements
  const int64_t total = rows * items_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total; item += stride) {
    const int64_t row = item / items_per_row;  // (b, t, h) flattened
    const int64_t i = item - row * items_per_row;
    const T* x_row = x + row * D;  // [D]
    T* out_row = out + row * D;
    if (i < half) {
      const int64_t t = (row / H) % T_len;
      const float c = cos[t * half + i];
      const float s = sin_sign * sin[t * half + i];
      const float x1 = to_float(x_row[i]);
      const float x2 = to_float(x_row[i + half]);
      out_row[i] = from_float<T>(x1 * c - x2 * s);
      out_row[i + half] = from_float<T>(x2 * c + x1 * s);
    } else {
      const int64_t j = i + half;  // 2*half + (i - half)
      out_row[j] = x_row[j];
    }
  }
}

}  // namespace

void rotary_apply(const void* x, const float* cos, const float* sin, void* out, int64_t B, int64_t T, int64_t H,
                  int64_t D, int64_t rotary_dims, float sin_sign, DType dtype, cudaStream_t stream) {
  if (B < 0 || T < 0 || H < 0 || D < 0 || rotary_dims <= 0 || rotary_dims % 2 != 0 || rotary_dims > D) {
    throw std::invalid_argument("rotary_apply: bad sizes B=" + std::to_string(B) + " T=" + std::to_string(T) +
                                " H=" + std::to_string(H) + " D=" + std::to_string(D) +
                                " rotary_dims=" + std::to_string(rotary_dims));
  }
  const int64_t rows = B * T * H;
  const int64_t half = rotary_dims / 2;
  const int64_t total = rows * (D - half);
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(total, kThreads), 1, kMaxBlocks));
  with_element_type(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    rotary_kernel<Elem><<<blocks, kThreads, 0, stream>>>(static_cast<const Elem*>(x), cos, sin, static_cast<Elem*>(out),
                                                         rows, T, H, D, half, sin_sign);
  });
  check_launch("rotary_apply");
}

}  // namespace keel::kernels::cuda

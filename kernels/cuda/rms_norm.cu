// Why: RMSNorm is memory-bound; the unfused LibTorch version makes an fp32 copy of x, squares it, reduces it and
// multiplies twice, each a full pass over [rows, C] in global memory. Here each row is read once for the sum of
// squares and once more (from cache) to write y, and the backward recomputes xhat from x and the saved per-row
// rstd instead of keeping fp32 activations. See kernels/rms_norm.cpp for the reference these must match.
//
// Geometry: a row is handled by `threads_per_row` threads (a multiple of 32, about C/4, at most 1024); small rows
// share a block (blockDim = [threads_per_row, rows_per_block]) so that a block has >= 256 threads.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "kernels/cuda/float_io.cuh"
#include "kernels/cuda/rms_norm.cuh"
#include "kernels/cuda/rms_norm_geometry.h"

namespace keel::kernels::cuda {
namespace {

constexpr int kWarp = 32;

RowGeometry row_geometry(int64_t C) { return rms_norm_row_geometry(C); }

// Sum of v over the threads of this row (threadIdx.y), in a fixed order. Every thread of the block must call it
// (it may __syncthreads); `scratch` holds one float per warp of the block (<= 32).
__device__ float row_sum(float v, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warps_per_row = blockDim.x / kWarp;
  if (warps_per_row == 1) return v;
  const int warp = threadIdx.x / kWarp;
  float* row_scratch = scratch + threadIdx.y * warps_per_row;
  __syncthreads();  // the previous call's readers are done with scratch
  if (threadIdx.x % kWarp == 0) row_scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += row_scratch[w];
  return total;
}

template <typename T>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x, const float* __restrict__ weight, T* __restrict__ y,
                                        float* __restrict__ rstd, int64_t rows, int C, float eps) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const T* x_row = x + (active ? row : 0) * C;  // [C]
  float sum_sq = 0.f;
  if (active) {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float v = to_float(x_row[c]);
      sum_sq += v * v;
    }
  }
  sum_sq = row_sum(sum_sq, scratch);
  if (!active) return;
  const float r = rsqrtf(sum_sq / static_cast<float>(C) + eps);
  T* y_row = y + row * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) y_row[c] = from_float<T>(to_float(x_row[c]) * r * weight[c]);
  if (threadIdx.x == 0) rstd[row] = r;
}

// Block b handles rows b*rows_per_block + y, then that plus gridDim.x*rows_per_block, ...; its per-column
// grad_weight partial sums go to workspace[b, :]. Each thread owns columns c = threadIdx.x (mod blockDim.x) of its
// row slot's accumulator, so accumulation needs no synchronisation. The accumulators live in shared memory
// ([rows_per_block, C]) when they fit, else directly in workspace[b, :] (then rows_per_block == 1).
template <typename T>
__global__ void rms_norm_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                         const float* __restrict__ weight, const float* __restrict__ rstd,
                                         T* __restrict__ grad_x, float* __restrict__ workspace, int64_t rows, int C,
                                         bool accumulate_in_shared) {
  extern __shared__ float shared_accumulators[];  // [rows_per_block, C] when accumulate_in_shared
  __shared__ float scratch[32];                   // kRmsNormBackwardStaticSharedBytes (rms_norm_geometry.h)
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t steps = (rows + rows_per_step - 1) / rows_per_step;  // the same for every thread: row_sum syncs
  float* acc = accumulate_in_shared ? shared_accumulators + static_cast<int64_t>(threadIdx.y) * C
                                    : workspace + static_cast<int64_t>(blockIdx.x) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] = 0.f;

  for (int64_t step = 0; step < steps; ++step) {
    const int64_t row = step * rows_per_step + static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const T* x_row = x + (active ? row : 0) * C;       // [C]
    const T* g_row = grad_y + (active ? row : 0) * C;  // [C]
    float dot = 0.f;                                   // sum_c g*w*x
    if (active) {
      for (int c = threadIdx.x; c < C; c += blockDim.x) dot += to_float(g_row[c]) * weight[c] * to_float(x_row[c]);
    }
    dot = row_sum(dot, scratch);
    if (!active) continue;
    const float r = rstd[row];
    const float mean_gw_xhat = r * dot / static_cast<float>(C);  // mean_c(g*w*xhat)
    T* gx_row = grad_x + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float g = to_float(g_row[c]);
      const float xhat = to_float(x_row[c]) * r;
      gx_row[c] = from_float<T>(r * (g * weight[c] - xhat * mean_gw_xhat));
      acc[c] += g * xhat;
    }
  }

  if (!accumulate_in_shared) return;
  __syncthreads();
  float* out = workspace + static_cast<int64_t>(blockIdx.x) * C;
  const int threads = blockDim.x * blockDim.y;
  for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < C; c += threads) {
    float total = 0.f;
    for (int slot = 0; slot < static_cast<int>(blockDim.y); ++slot) total += shared_accumulators[slot * C + c];
    out[c] = total;
  }
}

// grad_weight[c] = sum over b of workspace[b, c], b ascending.
__global__ void sum_partials_kernel(const float* __restrict__ workspace, float* __restrict__ grad_weight,
                                    int64_t partials, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float total = 0.f;
  for (int64_t b = 0; b < partials; ++b) total += workspace[b * C + c];
  grad_weight[c] = total;
}

void check_sizes(const char* op, int64_t rows, int64_t C) {
  if (rows < 0 || C < 0 || C > INT_MAX) {
    throw std::invalid_argument(std::string(op) + ": bad sizes rows=" + std::to_string(rows) +
                                " C=" + std::to_string(C));
  }
}

// Once per process: the compiled backward kernel's static shared memory is what rms_norm_backward_launch
// budgets for (a kernel edit that adds __shared__ arrays must update kRmsNormBackwardStaticSharedBytes).
void check_backward_static_shared() {
  static const int64_t static_bytes = [] {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, rms_norm_backward_kernel<float>) != cudaSuccess) return int64_t{-1};
    return static_cast<int64_t>(attributes.sharedSizeBytes);
  }();
  if (static_bytes > kRmsNormBackwardStaticSharedBytes) {
    throw std::logic_error("rms_norm_backward: the kernel uses " + std::to_string(static_bytes) +
                           " B of static shared memory, kernels/cuda/rms_norm_geometry.h budgets " +
                           std::to_string(kRmsNormBackwardStaticSharedBytes));
  }
}

}  // namespace

void rms_norm_forward(const void* x, const float* weight, void* y, float* rstd, int64_t rows, int64_t C, float eps,
                      DType dtype, cudaStream_t stream) {
  check_sizes("rms_norm_forward", rows, C);
  if (rows == 0 || C == 0) return;
  const RowGeometry g = row_geometry(C);
  const dim3 block(g.threads_per_row, g.rows_per_block);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, g.rows_per_block)));
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_forward_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(x), weight, static_cast<T*>(y), rstd,
                                                           rows, static_cast<int>(C), eps);
  });
  check_launch("rms_norm_forward");
}

int64_t rms_norm_backward_partials(int64_t rows, int64_t C) {
  check_sizes("rms_norm_backward_partials", rows, C);
  const RowGeometry g = row_geometry(C);
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    throw std::runtime_error("rms_norm_backward_partials: cannot query the current CUDA device: " +
                             std::string(cudaGetErrorString(cudaGetLastError())));
  }
  const int64_t blocks_needed = ceil_div(rows, g.rows_per_block);
  const int64_t blocks_per_sm = std::max(1, 2048 / (g.threads_per_row * g.rows_per_block));
  return std::max<int64_t>(1, std::min<int64_t>(blocks_needed, static_cast<int64_t>(sms) * blocks_per_sm));
}

void rms_norm_backward(const void* grad_y, const void* x, const float* weight, const float* rstd, void* grad_x,
                       float* grad_weight, float* workspace, int64_t partials, int64_t rows, int64_t C, DType dtype,
                       cudaStream_t stream) {
  check_sizes("rms_norm_backward", rows, C);
  if (C == 0) return;
  if (rows == 0) {
    const cudaError_t err = cudaMemsetAsync(grad_weight, 0, sizeof(float) * static_cast<size_t>(C), stream);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("rms_norm_backward: zeroing grad_weight failed: ") +
                               cudaGetErrorString(err));
    }
    return;
  }
  if (partials < 1 || partials > INT_MAX) {
    throw std::invalid_argument("rms_norm_backward: partials must be in [1, INT_MAX], got " + std::to_string(partials));
  }
  check_backward_static_shared();
  const RmsNormBackwardLaunch launch = rms_norm_backward_launch(C);
  const RowGeometry g = launch.geometry;
  const bool accumulate_in_shared = launch.accumulate_in_shared;
  const int64_t shared_bytes = launch.dynamic_shared_bytes;
  const dim3 block(g.threads_per_row, g.rows_per_block);
  const dim3 grid(static_cast<unsigned>(partials));
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_backward_kernel<T><<<grid, block, static_cast<size_t>(shared_bytes), stream>>>(
        static_cast<const T*>(grad_y), static_cast<const T*>(x), weight, rstd, static_cast<T*>(grad_x), workspace, rows,
        static_cast<int>(C), accumulate_in_shared);
  });
  check_launch("rms_norm_backward");
  constexpr int kThreads = 256;
  sum_partials_kernel<<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
      workspace, grad_weight, partials, static_cast<int>(C));
  check_launch("rms_norm_backward (sum partials)");
}

}  // namespace keel::kernels::cuda

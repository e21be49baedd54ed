// Why: see cross_entropy.cuh. One block per row, two reads of the row: the first keeps an online (max, sum-exp)
// pair per thread (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax") and merges the pairs
// over the block; the second writes the gradient over the logits. Loads and stores are 16-byte vectors where
// the row is aligned, so a bf16 row moves 8 values per instruction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cross_entropy.cuh"

namespace keel::kernels::cuda {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

// 16 bytes of T: the unit of a vector load/store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The running softmax normaliser of a set of logits: max m and s = sum exp(x - m). Empty set: (-inf, 0).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ void add_logit(MaxSum& acc, float x) {
  if (x == -INFINITY) return;  // exp(-inf) adds nothing (and -inf - -inf would be NaN)
  if (x <= acc.m) {
    acc.s += expf(x - acc.m);
  } else {  // a new max (or x is NaN, which then poisons s, as it should)
    acc.s = acc.s * expf(acc.m - x) + 1.0f;
    acc.m = x;
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;  // both empty
  return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// The merged (max, sum) of every thread of the block, returned to all of them.
__device__ MaxSum block_merge(MaxSum acc) {
  __shared__ float shared_m[32];
  __shared__ float shared_s[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, offset), __shfl_xor_sync(0xffffffffu, acc.s, offset)};
    acc = merge(acc, other);
  }
  if (lane == 0) {
    shared_m[warp] = acc.m;
    shared_s[warp] = acc.s;
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
  acc = lane < warps ? MaxSum{shared_m[lane], shared_s[lane]} : MaxSum{-INFINITY, 0.0f};
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, offset), __shfl_xor_sync(0xffffffffu, acc.s, offset)};
    acc = merge(acc, other);
  }
  return acc;  // every warp reduced the same 32 values, so every thread holds the block's result
}

// grid: one block per row; blockDim a multiple of 32, at most 1024.
template <typename T>
__global__ void cross_entropy_rows_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
                                          float* __restrict__ log_z, float* __restrict__ nll, int64_t vocab,
                                          float z_loss_coef, float grad_scale, int64_t ignore_index) {
  constexpr int kPack = Pack<T>::kSize;
  const int64_t r = blockIdx.x;
  T* row = logits + r * vocab;  // [vocab]
  const int64_t target = targets[r];
  const bool ignored = target == ignore_index;  // no loss, no gradient (padding, masked prompt tokens)
  const bool target_ok = target >= 0 && target < vocab;
  const int64_t onehot = ignored ? -1 : target;  // the column that gets -grad_scale (none when ignored)
  // Read before any thread writes: the writes below come after the __syncthreads in block_merge.
  const float target_logit = target_ok && !ignored ? to_float(row[target]) : NAN;

  const bool vectorised = reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const int64_t vector_end = vectorised ? (vocab / kPack) * kPack : 0;  // [0, vector_end) in packs, then scalars
  const int64_t tid = threadIdx.x, threads = blockDim.x;

  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t i = tid * kPack; i < vector_end; i += threads * kPack) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) add_logit(acc, to_float(pack.v[k]));
  }
  for (int64_t i = vector_end + tid; i < vocab; i += threads) add_logit(acc, to_float(row[i]));
  acc = block_merge(acc);

  const float row_log_z = acc.m + logf(acc.s);
  if (tid == 0) {
    log_z[r] = row_log_z;
    nll[r] = ignored ? 0.0f : row_log_z - target_logit;
  }
  // d loss / d x_j = (softmax_j (1 + 2 coef logZ) - [j == target]) * grad_scale; exactly 0 on an ignored row
  const float softmax_scale = ignored ? 0.0f : (1.0f + 2.0f * z_loss_coef * row_log_z) * grad_scale;
  for (int64_t i = tid * kPack; i < vector_end; i += threads * kPack) {
    Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      float g = ignored ? 0.0f : expf(to_float(pack.v[k]) - row_log_z) * softmax_scale;
      if (i + k == onehot) g -= grad_scale;
      pack.v[k] = from_float<T>(g);
    }
    *reinterpret_cast<Pack<T>*>(row + i) = pack;
  }
  for (int64_t i = vector_end + tid; i < vocab; i += threads) {
    float g = ignored ? 0.0f : expf(to_float(row[i]) - row_log_z) * softmax_scale;
    if (i == onehot) g -= grad_scale;
    row[i] = from_float<T>(g);
  }
}

template <typename T>
void launch(void* logits, const int64_t* targets, float* log_z, float* nll, int64_t rows, int64_t vocab,
            float z_loss_coef, float grad_scale, int64_t ignore_index, cudaStream_t stream) {
  // Enough threads that each handles a few packs of a row; 32k-256k vocabularies get the full 1024.
  const int64_t packs = (vocab + Pack<T>::kSize - 1) / Pack<T>::kSize;
  int threads = 32;
  while (threads < 1024 && threads * 4 < packs) threads *= 2;
  cross_entropy_rows_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<T*>(logits), targets, log_z, nll, vocab, z_loss_coef, grad_scale, ignore_index);
}

}  // namespace

void cross_entropy_rows(void* logits, DType dtype, const int64_t* targets, float* log_z, float* nll, int64_t rows,
                        int64_t vocab, float z_loss_coef, float grad_scale, int64_t ignore_index, cudaStream_t stream) {
  if (rows <= 0) return;
  if (rows > 0x7fffffff) throw std::invalid_argument("cross_entropy_rows: more than 2^31-1 rows in one chunk");
  if (vocab <= 0) throw std::invalid_argument("cross_entropy_rows: vocab must be positive");
  switch (dtype) {
    case DType::kFloat32:
      launch<float>(logits, targets, log_z, nll, rows, vocab, z_loss_coef, grad_scale, ignore_index, stream);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(logits, targets, log_z, nll, rows, vocab, z_loss_coef, grad_scale, ignore_index, stream);
      break;
    case DType::kFloat16:
      launch<__half>(logits, targets, log_z, nll, rows, vocab, z_loss_coef, grad_scale, ignore_index, stream);
      break;
  }
  check_launch("cross_entropy_rows");
}

}  // namespace keel::kernels::cuda

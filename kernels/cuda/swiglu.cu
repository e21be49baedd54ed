// Why: in the MLP, silu(gate) * up unfused is three elementwise passes over [B, T, F] (silu, multiply, and in the
// backward several more) with intermediates kept for autograd. Fused, the forward reads gate and up once and
// writes out once; the backward reads grad, gate and up once and writes both gradients, recomputing sigmoid.
// Loads and stores are 16 bytes wide (8 bf16 or 4 fp32) when every pointer is 16-byte aligned; the tail that does
// not fill a 16-byte pack, or everything when a pointer is misaligned, goes element by element.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/float_io.cuh"
#include "kernels/cuda/swiglu.cuh"

namespace keel::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

// V elements of T loaded or stored as one 16-byte access (V == 1: a plain element).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t pack_index) {
  return reinterpret_cast<const Pack<T, V>*>(p)[pack_index];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, int64_t pack_index, const Pack<T, V>& pack) {
  reinterpret_cast<Pack<T, V>*>(p)[pack_index] = pack;
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.f + expf(-g)) * u; }

template <typename T, int V>
__global__ void swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / V;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<T, V> g = load_pack<T, V>(gate, i);
    const Pack<T, V> u = load_pack<T, V>(up, i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(swiglu_value(to_float(g.v[k]), to_float(u.v[k])));
    store_pack<T, V>(out, i, o);
  }
  for (int64_t i = packs * V + first; i < n; i += stride) {
    out[i] = from_float<T>(swiglu_value(to_float(gate[i]), to_float(up[i])));
  }
}

__device__ __forceinline__ void swiglu_grads(float dy, float g, float u, float& d_gate, float& d_up) {
  const float s = sigmoid(g);
  d_gate = dy * u * s * (1.f + g * (1.f - s));
  d_up = dy * g * s;
}

template <typename T, int V>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate,
                                       const T* __restrict__ up, T* __restrict__ grad_gate, T* __restrict__ grad_up,
                                       int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / V;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<T, V> dy = load_pack<T, V>(grad_out, i);
    const Pack<T, V> g = load_pack<T, V>(gate, i);
    const Pack<T, V> u = load_pack<T, V>(up, i);
    Pack<T, V> dg;
    Pack<T, V> du;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float d_gate, d_up;
      swiglu_grads(to_float(dy.v[k]), to_float(g.v[k]), to_float(u.v[k]), d_gate, d_up);
      dg.v[k] = from_float<T>(d_gate);
      du.v[k] = from_float<T>(d_up);
    }
    store_pack<T, V>(grad_gate, i, dg);
    store_pack<T, V>(grad_up, i, du);
  }
  for (int64_t i = packs * V + first; i < n; i += stride) {
    float d_gate, d_up;
    swiglu_grads(to_float(grad_out[i]), to_float(gate[i]), to_float(up[i]), d_gate, d_up);
    grad_gate[i] = from_float<T>(d_gate);
    grad_up[i] = from_float<T>(d_up);
  }
}

bool all_16_byte_aligned(std::initializer_list<const void*> pointers) {
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; });
}

unsigned blocks_for(int64_t work_items) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(work_items, kThreads), 1, kMaxBlocks));
}

}  // namespace

void swiglu_forward(const void* gate, const void* up, void* out, int64_t n, DType dtype, cudaStream_t stream) {
  if (n <= 0) return;
  const bool wide = all_16_byte_aligned({gate, up, out});
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = 16 / sizeof(T);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* o = static_cast<T*>(out);
    if (wide) {
      swiglu_forward_kernel<T, kWide>
          <<<blocks_for(std::max<int64_t>(n / kWide, n % kWide)), kThreads, 0, stream>>>(g, u, o, n);
    } else {
      swiglu_forward_kernel<T, 1><<<blocks_for(n), kThreads, 0, stream>>>(g, u, o, n);
    }
  });
  check_launch("swiglu_forward");
}

void swiglu_backward(const void* grad_out, const void* gate, const void* up, void* grad_gate, void* grad_up, int64_t n,
                     DType dtype, cudaStream_t stream) {
  if (n <= 0) return;
  const bool wide = all_16_byte_aligned({grad_out, gate, up, grad_gate, grad_up});
  with_element_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = 16 / sizeof(T);
    const auto* dy = static_cast<const T*>(grad_out);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* dg = static_cast<T*>(grad_gate);
    auto* du = static_cast<T*>(grad_up);
    if (wide) {
      swiglu_backward_kernel<T, kWide>
          <<<blocks_for(std::max<int64_t>(n / kWide, n % kWide)), kThreads, 0, stream>>>(dy, g, u, dg, du, n);
    } else {
      swiglu_backward_kernel<T, 1><<<blocks_for(n), kThreads, 0, stream>>>(dy, g, u, dg, du, n);
    }
  });
  check_launch("swiglu_backward");
}

}  // namespace keel::kernels::cuda

// Why: see optimizer_step.cuh. Each block updates one chunk of kChunk elements of one tensor; the host walks the
// tensors, filling a TensorLists argument struct (pointers, sizes, decay factors, and for each block its tensor
// and chunk), and launches whenever the struct is full: a 7B model's ~300 tensors take a handful of launches.
// The struct stays under the classic 4 KB kernel-parameter limit. Arithmetic is fp32 in the order of the
// LibTorch reference (kernels/optimizer_step.cpp); float4 loads where a chunk's pointers are 16-byte aligned.
#include <cstdint>

#include "kernels/cuda/optimizer_step.cuh"

namespace keel::kernels::cuda {
namespace {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;

// Depth lists of fp32 tensors: list 0 the params, 1 the grads (read only), then the optimizer's moments.
template <int Depth, int MaxTensors, int MaxBlocks, typename Scalars>
struct TensorLists {
  float* ptrs[Depth][MaxTensors];
  int64_t sizes[MaxTensors];
  float decay_factors[MaxTensors];
  uint8_t block_tensor[MaxBlocks];  // slot of the tensor block b works on
  int32_t block_chunk[MaxBlocks];   // and which chunk of it
  Scalars scalars;
};

struct AdamWOp {
  // x = {param, grad, exp_avg, exp_avg_sq}
  __device__ __forceinline__ static void apply(float (&x)[4], float decay_factor, const AdamWScalars& s) {
    const float g = x[1];
    float p = x[0] * decay_factor;
    float m = x[2] + s.one_minus_beta1 * (g - x[2]);       // lerp_(g, 1 - beta1)
    float v = x[3] * s.beta2 + s.one_minus_beta2 * g * g;  // mul_(beta2).addcmul_(g, g, 1 - beta2)
    const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
    p = p + s.neg_step_size * (m / denom);  // addcdiv_(m, denom, -step_size)
    x[0] = p;
    x[2] = m;
    x[3] = v;
  }
};

struct LionOp {
  // x = {param, grad, exp_avg}
  __device__ __forceinline__ static void apply(float (&x)[3], float decay_factor, const LionScalars& s) {
    const float g = x[1];
    // exp_avg.mul(beta1).add_(g, 1 - beta1): a rounded product, then LibTorch's vectorised add, a fused multiply-add
    const float interpolated = fmaf(g, s.one_minus_beta1, __fmul_rn(x[2], s.beta1));
    const float update = interpolated > 0.0f ? 1.0f : (interpolated < 0.0f ? -1.0f : 0.0f);  // sign, sign(0) = 0
    float p = x[0] * decay_factor;
    p = fmaf(update, s.neg_lr, p);  // exact: update is -1, 0 or 1
    x[0] = p;
    x[2] = fmaf(g, s.one_minus_beta2, __fmul_rn(x[2], s.beta2));
  }
};

template <typename Op, int Depth, int MaxTensors, int MaxBlocks, typename Scalars>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(TensorLists<Depth, MaxTensors, MaxBlocks, Scalars> lists) {
  const int t = lists.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(lists.block_chunk[blockIdx.x]) * kChunk;
  const int64_t remaining = lists.sizes[t] - begin;
  const int64_t n = remaining < kChunk ? remaining : kChunk;
  const float decay_factor = lists.decay_factors[t];
  float* chunk[Depth];
  bool aligned = true;
#pragma unroll
  for (int d = 0; d < Depth; ++d) {
    chunk[d] = lists.ptrs[d][t] + begin;
    aligned = aligned && reinterpret_cast<uintptr_t>(chunk[d]) % 16 == 0;
  }
  const int64_t vector_end = aligned ? (n / 4) * 4 : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * 4; i < vector_end; i += static_cast<int64_t>(blockDim.x) * 4) {
    float4 packs[Depth];
#pragma unroll
    for (int d = 0; d < Depth; ++d) packs[d] = *reinterpret_cast<const float4*>(chunk[d] + i);
    float x[4][Depth];
#pragma unroll
    for (int d = 0; d < Depth; ++d) {
      x[0][d] = packs[d].x;
      x[1][d] = packs[d].y;
      x[2][d] = packs[d].z;
      x[3][d] = packs[d].w;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) Op::apply(x[k], decay_factor, lists.scalars);
#pragma unroll
    for (int d = 0; d < Depth; ++d) {
      if (d == 1) continue;  // the gradient is read only
      *reinterpret_cast<float4*>(chunk[d] + i) = make_float4(x[0][d], x[1][d], x[2][d], x[3][d]);
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    float x[Depth];
#pragma unroll
    for (int d = 0; d < Depth; ++d) x[d] = chunk[d][i];
    Op::apply(x, decay_factor, lists.scalars);
#pragma unroll
    for (int d = 0; d < Depth; ++d) {
      if (d != 1) chunk[d][i] = x[d];
    }
  }
}

// The multi_tensor_apply walk: lists[d][i] is tensor i of list d.
template <typename Op, int Depth, int MaxTensors, int MaxBlocks, typename Scalars>
void multi_tensor_apply(const char* op_name, float* const* const (&lists)[Depth], const int64_t* sizes,
                        const float* decay_factors, int64_t tensors, const Scalars& scalars, cudaStream_t stream) {
  using Args = TensorLists<Depth, MaxTensors, MaxBlocks, Scalars>;
  static_assert(sizeof(Args) <= 4000, "kernel argument struct over the 4 KB parameter limit");
  static_assert(MaxTensors <= 256, "block_tensor is a uint8_t slot");
  Args args{};
  args.scalars = scalars;
  int slots = 0, blocks = 0;
  auto launch = [&] {
    multi_tensor_kernel<Op><<<blocks, kThreads, 0, stream>>>(args);
    check_launch(op_name);
    blocks = 0;
  };
  for (int64_t i = 0; i < tensors; ++i) {
    if (sizes[i] < 0) throw std::invalid_argument(std::string(op_name) + ": negative tensor size");
    if (sizes[i] == 0) continue;
    if (slots == MaxTensors) {  // every slot taken: run what is queued, start over
      if (blocks > 0) launch();
      slots = 0;
    }
    for (int d = 0; d < Depth; ++d) args.ptrs[d][slots] = const_cast<float*>(lists[d][i]);
    args.sizes[slots] = sizes[i];
    args.decay_factors[slots] = decay_factors[i];
    const int64_t chunks = (sizes[i] + kChunk - 1) / kChunk;
    if (chunks > 0x7fffffff) throw std::invalid_argument(std::string(op_name) + ": tensor too large");
    for (int64_t c = 0; c < chunks; ++c) {
      if (blocks == MaxBlocks) {  // the block table is full mid-tensor: run it, keep this tensor in slot 0
        launch();
        for (int d = 0; d < Depth; ++d) args.ptrs[d][0] = args.ptrs[d][slots];
        args.sizes[0] = args.sizes[slots];
        args.decay_factors[0] = args.decay_factors[slots];
        slots = 0;
      }
      args.block_tensor[blocks] = static_cast<uint8_t>(slots);
      args.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
    }
    ++slots;
  }
  if (blocks > 0) launch();
}

}  // namespace

void adamw_step(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
                const int64_t* sizes, const float* decay_factors, int64_t tensors, const AdamWScalars& scalars,
                cudaStream_t stream) {
  float* const* const lists[4] = {params, const_cast<float* const*>(grads), exp_avgs, exp_avg_sqs};
  multi_tensor_apply<AdamWOp, 4, 36, 320>("adamw_step", lists, sizes, decay_factors, tensors, scalars, stream);
}

void lion_step(float* const* params, const float* const* grads, float* const* exp_avgs, const int64_t* sizes,
               const float* decay_factors, int64_t tensors, const LionScalars& scalars, cudaStream_t stream) {
  float* const* const lists[3] = {params, const_cast<float* const*>(grads), exp_avgs};
  multi_tensor_apply<LionOp, 3, 48, 320>("lion_step", lists, sizes, decay_factors, tensors, scalars, stream);
}

}  // namespace keel::kernels::cuda

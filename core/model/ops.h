// Why: the one place the model chooses between a fused kernel (kernels/) and its LibTorch reference. The
// decoder's forwards call these functions and never ask kernels::model_uses_fused_ops themselves, so "which
// ops fuse, and when" is answered here alone. Shapes: B batch, T time, C d_model, h heads, D head dim, F ffn
// hidden, N = B*T rows, V vocab.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

#include "core/model/tp_layers.h"
#include "core/parallel/tensor_parallel.h"

namespace keel::model {

// x: [..., C] -> [..., C] in x's dtype; statistics in fp32; weight [C] fp32. Fused kernel on a GPU.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
// x: [..., C] -> [..., C] in x's dtype; statistics in fp32; weight, bias [C] fp32. Always the LibTorch op.
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps);

// RoPE tables computed in fp32 (inverse frequencies and angles), applied to the first `rotary_dims` of each head.
struct RotaryTables {
  int64_t rotary_dims = 0;  // even, <= D
  torch::Tensor cos;        // [T, rotary_dims/2] fp32
  torch::Tensor sin;        // [T, rotary_dims/2] fp32
};
RotaryTables make_rotary_tables(int64_t head_dim, double rotary_fraction, double theta, int64_t max_len);
// x: [B, T, h, D] -> same shape and dtype; rotation done in fp32 (rotate-half convention, as HF LLaMA/NeoX).
// Fused kernel on a GPU.
torch::Tensor apply_rotary(const torch::Tensor& x, const RotaryTables& tables);

// silu(gate) * up: [..., F] each -> [..., F]. Fused kernel on a GPU.
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// The output head and the loss. h: [B, T, C] after the final norm; head_weight: [V/tp, C] fp32 (the head's or,
// tied, the embedding's); targets [B, T] int64; `logits_of` makes this rank's logits [B, T, V/tp] from h (the
// head layer's forward). On a GPU with one vocabulary shard the head and the loss are fused chunk by chunk, so
// the [N, V] logits never exist at once (kernels/cross_entropy.h); otherwise logits_of, then
// vocab_parallel_cross_entropy. Returns fp32 losses.
CrossEntropyParts head_cross_entropy(const torch::Tensor& h, const torch::Tensor& head_weight,
                                     const torch::Tensor& targets, double z_loss_coef,
                                     const parallel::TensorParallel& tp,
                                     const std::function<torch::Tensor(const torch::Tensor&)>& logits_of);

}  // namespace keel::model

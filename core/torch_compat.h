// Why: Keel builds against Debian's LibTorch 1.13 (CPU, CI) and the LibTorch 2.x inside a GPU machine's
// PyTorch. Every API difference between the two lives here and nowhere else, so the rest of the core is written
// once. Include only from .cpp files (it pulls in ATen).
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

namespace keel::compat {

// Causal self-attention. q: [B, H, T, D], k/v: [B, H, T, D] (GQA already expanded). Returns [B, H, T, D].
// On 2.x this is the fused SDPA (flash/cuDNN/mem-efficient on CUDA). On 1.13 only a private op exists, so the
// math path is written out: scores in the compute dtype, softmax statistics in fp32.
inline at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
#else
  const int64_t T = q.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, T, T]
  at::Tensor mask = at::ones({T, T}, q.options().dtype(at::kBool)).triu(1);
  at::Tensor probs = scores.to(at::kFloat).masked_fill(mask, -std::numeric_limits<float>::infinity()).softmax(-1);
  return at::matmul(probs.to(q.scalar_type()), v);  // [B, H, T, D]
#endif
}

}  // namespace keel::compat

// Why: see ops.h. Each function is "fused kernel when kernels::model_uses_fused_ops says so, else the reference
// written in LibTorch ops"; the references are what the kernel tests compare against.
#include "core/model/ops.h"

#include <torch/torch.h>

#include <cmath>

#include "kernels/cross_entropy.h"
#include "kernels/dispatch.h"
#include "kernels/rms_norm.h"
#include "kernels/rotary.h"
#include "kernels/swiglu.h"

namespace keel::model {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  // On a GPU: one fused kernel each way (kernels/rms_norm.h) instead of ~8 memory-bound LibTorch ops.
  if (kernels::model_uses_fused_ops(x)) return kernels::rms_norm(x, weight, eps);
  torch::Tensor xf = x.to(torch::kFloat);  // [..., C] statistics in fp32
  torch::Tensor y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight;
  return y.to(x.scalar_type());
}

torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  torch::Tensor xf = x.to(torch::kFloat);  // [..., C] statistics in fp32
  return torch::layer_norm(xf, {xf.size(-1)}, weight, bias, eps).to(x.scalar_type());
}

RotaryTables make_rotary_tables(int64_t head_dim, double rotary_fraction, double theta, int64_t max_len) {
  RotaryTables tables;
  tables.rotary_dims = static_cast<int64_t>(std::floor(head_dim * rotary_fraction / 2.0)) * 2;
  const int64_t half = tables.rotary_dims / 2;
  auto fp32 = torch::TensorOptions().dtype(torch::kFloat);
  // inv_freq[i] = theta^(-2i/rotary_dims), always fp32 (CrystalCoder: lower precision here hurt training).
  torch::Tensor inv_freq =
      torch::pow(theta, -torch::arange(0, half, fp32) * 2.0 / std::max<int64_t>(tables.rotary_dims, 1));
  torch::Tensor positions = torch::arange(0, max_len, fp32);  // [T]
  torch::Tensor angles = torch::outer(positions, inv_freq);   // [T, half]
  tables.cos = angles.cos();
  tables.sin = angles.sin();
  return tables;
}

torch::Tensor apply_rotary(const torch::Tensor& x, const RotaryTables& tables) {
  if (tables.rotary_dims == 0) return x;
  if (kernels::model_uses_fused_ops(x)) return kernels::apply_rotary(x, tables.cos, tables.sin, tables.rotary_dims);
  const int64_t T = x.size(1);
  const int64_t half = tables.rotary_dims / 2;
  torch::Tensor rot = x.narrow(-1, 0, tables.rotary_dims).to(torch::kFloat);  // [B, T, h, R]
  torch::Tensor x1 = rot.narrow(-1, 0, half);                                 // [B, T, h, R/2]
  torch::Tensor x2 = rot.narrow(-1, half, half);
  torch::Tensor cos = tables.cos.narrow(0, 0, T).to(x.device()).view({1, T, 1, half});
  torch::Tensor sin = tables.sin.narrow(0, 0, T).to(x.device()).view({1, T, 1, half});
  torch::Tensor rotated = torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
  if (tables.rotary_dims == x.size(-1)) return rotated;
  return torch::cat({rotated, x.narrow(-1, tables.rotary_dims, x.size(-1) - tables.rotary_dims)}, -1);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (kernels::model_uses_fused_ops(gate)) return kernels::swiglu(gate, up);
  return torch::silu(gate) * up;  // [..., F]
}

CrossEntropyParts head_cross_entropy(const torch::Tensor& h, const torch::Tensor& head_weight,
                                     const torch::Tensor& targets, double z_loss_coef,
                                     const parallel::TensorParallel& tp,
                                     const std::function<torch::Tensor(const torch::Tensor&)>& logits_of) {
  if (tp.size == 1 && kernels::model_uses_fused_ops(h)) {
    const torch::Tensor rows = h.reshape({-1, h.size(-1)});  // [N, C]
    const kernels::FusedCrossEntropy parts = kernels::fused_linear_cross_entropy(
        rows, head_weight, targets.reshape({-1}), z_loss_coef,
        kernels::cross_entropy_chunk_rows(rows.size(0), head_weight.size(0), rows.size(1)));
    return {parts.loss, parts.nll, parts.z_loss, parts.row_nll};
  }
  torch::Tensor logits_local = logits_of(h);  // [B, T, V/tp]
  return vocab_parallel_cross_entropy(logits_local.reshape({-1, logits_local.size(-1)}), targets.reshape({-1}),
                                      z_loss_coef, tp);
}

}  // namespace keel::model

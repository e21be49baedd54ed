// Why: the output head's logits are the largest activation of a LLaMA step ([B*T, V] with V = 32k-256k), and
// their fp32 copy for the softmax is larger still. The fused linear + cross-entropy (after Liger-Kernel's
// FusedLinearCrossEntropy) never holds more than one chunk of rows of logits: for each chunk it computes the
// logits, their softmax statistics and their gradient in place, then folds that gradient into the gradients of
// the hidden states and of the head weight right away, so the backward only rescales two saved tensors.
// Single vocabulary shard only (tp.size == 1); the tensor-parallel head keeps model::vocab_parallel_cross_entropy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace keel::kernels {

// PyTorch's default: a target equal to it is ignored (padding, masked prompt tokens).
constexpr int64_t kIgnoreIndex = -100;

// The three scalars of model::CrossEntropyParts, each fp32 on the inputs' device.
struct FusedCrossEntropy {
  at::Tensor loss;     // mean token NLL + z_loss (the only differentiable output)
  at::Tensor nll;      // mean token NLL over the rows not ignored (for reporting)
  at::Tensor z_loss;   // z_loss_coef * mean (log Z)^2 over the same rows (for reporting; 0 when z_loss_coef == 0)
  at::Tensor row_nll;  // [N] each row's NLL, 0 for an ignored row (for per-sample losses; not differentiable)
};

// hidden:  [N, C] compute dtype (fp32, bf16 or fp16)
// weight:  [V, C] the head's master weight (fp32); the logits use weight.to(hidden's dtype)
// targets: [N] int64 in [0, V), or ignore_index: such a row adds neither loss nor gradient, and the means are
//          over the other rows, counted on the device (no host sync); with every row ignored the losses and
//          gradients are 0. Checked when on CPU; on a GPU any other out-of-range target makes the loss NaN.
// z_loss_coef >= 0; chunk_rows > 0 rows of logits at a time ([chunk_rows, V] in the compute dtype).
// Differentiable w.r.t. hidden and weight when grad mode is on and they require grad; then the forward already
// does the gradient work (two more matmuls per chunk). Softmax statistics are fp32. Nothing is read back to the
// host. Uses kernels/cuda/cross_entropy.cu when use_fused(hidden), else the reference below.
FusedCrossEntropy fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& targets, double z_loss_coef, int64_t chunk_rows,
                                             int64_t ignore_index = kIgnoreIndex);

// The same chunked algorithm with the per-row statistics and gradient written in LibTorch ops (an fp32 copy of
// one chunk of logits), on any device: the CPU path and what the CUDA kernel is tested against.
FusedCrossEntropy fused_linear_cross_entropy_reference(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& targets, double z_loss_coef,
                                                       int64_t chunk_rows, int64_t ignore_index = kIgnoreIndex);

// A chunk size whose logits are about as large as `hidden` itself (Liger's rule): rows / ceil(V / C), rounded
// up to a power of two, at most `rows`, at least 1.
int64_t cross_entropy_chunk_rows(int64_t rows, int64_t vocab, int64_t dim);

}  // namespace keel::kernels

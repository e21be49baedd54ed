// Why: the one step of the vocab-chunked fused linear + cross-entropy that LibTorch has no single op for: per
// row of a logits chunk, the fp32 softmax statistics (online max and sum-exp in one read), the loss terms, and
// the logits' gradient written over the logits themselves, so no fp32 [rows, V] tensor ever exists. The matmuls
// around it stay cuBLAS calls in kernels/cross_entropy.cpp. Torch-free: raw pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "kernels/cuda/launch.cuh"

namespace keel::kernels::cuda {

// logits:  [rows, vocab] row-major in `dtype`; read, then overwritten with d loss / d logits:
//          (softmax * (1 + 2 z_loss_coef logZ) - onehot(target)) * grad_scale
// targets: [rows] int64 vocabulary ids; a row whose target is `ignore_index` gets nll = 0 and a zero gradient
//          row (its log_z is still written; the caller leaves it out of the z-loss); any other id outside
//          [0, vocab) gives nll = NaN and no one-hot term
// log_z:   [rows] fp32 out, log sum_j exp(logits_j)
// nll:     [rows] fp32 out, logZ - logits[target]
// One block per row; fp32 statistics whatever `dtype` is.
void cross_entropy_rows(void* logits, DType dtype, const int64_t* targets, float* log_z, float* nll, int64_t rows,
                        int64_t vocab, float z_loss_coef, float grad_scale, int64_t ignore_index, cudaStream_t stream);

}  // namespace keel::kernels::cuda

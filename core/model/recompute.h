// Why: activation recomputation (model.recompute) trades compute for memory: a block's forward runs without
// autograd keeping its intermediate tensors, and its backward runs that forward again to rebuild them. LibTorch's
// C++ API has no torch.utils.checkpoint, so this is one torch::autograd::Function (the reentrant checkpoint):
//   full       keeps only the block's input [B, T, C]; backward re-runs the whole block, collectives included;
//   selective  also keeps the output of every GEMM of the block (wq, wk, wv, wo, w_gate, w_up, w_down: the
//              row-parallel ones after their TP reduction), so backward re-runs only the cheap parts in between:
//              norms, RoPE, the attention core (its [H, T, T] softmax is the largest activation of the reference
//              path), SwiGLU; no GEMM of a projection and no TP all-reduce is issued twice.
// Re-running gives the same bits: the block draws no random numbers (Keel has no dropout) and its kernels are
// deterministic on CPU, so losses and gradients equal model.recompute = none exactly (tests/unit/test_recompute).
// Collectives re-issued in the backward re-run come in the same order on every TP rank, because every rank runs
// the same blocks' backwards in the same order (the pipeline schedule is the same across a TP group).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

#include "core/config/config.h"

namespace keel::model {

// x: [B, T, C] -> block(x) [B, T, C], keeping for backward only what `policy` says. With Recompute::kNone, grad
// mode off (evaluation) or an input that needs no gradient, this is block(x) with no wrapper. `block` must be
// pure (the same output for the same input and weights) and stays alive until the backward has run.
at::Tensor run_recomputed(Recompute policy, const std::function<at::Tensor(const at::Tensor&)>& block,
                          const at::Tensor& x);

// A projection whose output selective recomputation keeps: y = compute(x, w), x [..., in], w [out, in] in x's
// dtype (the TP layers' cast weight), y [..., out] (after any TP reduction, whose backward must be the identity).
// Outside a selective re-run this is compute(x, w). While a selectively recomputed block runs forward the output
// is also stored; while it re-runs in backward the stored output is returned instead of computing it again, with
// the backward of x.matmul(w.t()) (the same kernels as at::linear's, so the gradients are bit-identical).
// `output_grad_to_gemm` maps the gradient of y to that of the matmul's own output when what follows the matmul
// inside `compute` has a backward other than the identity (sequence parallelism's reduce-scatter: an all-gather).
at::Tensor kept_gemm(const at::Tensor& x, const at::Tensor& w,
                     const std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>& compute,
                     const std::function<at::Tensor(const at::Tensor&)>& output_grad_to_gemm = nullptr);

// True while a block's forward runs again inside model.recompute's backward on this thread (observers of the
// forward, such as core/model/forward_stats.h, record the first run only).
bool recompute_rerun_active();

}  // namespace keel::model

// Why: instability precursors (metrics.stats_every, docs/metrics.md) are read from inside the forward: the largest
// pre-softmax attention logit of each head, the RMS of each block's output, and the output logits' mean, max and
// log-partition (z). They are accumulated on the activations' device across one step's micro-batches, with no host
// read (the trainer reads the reduced result once after the step). The model finds the step's accumulator through a
// thread-local scope (as recompute.cpp finds its kept GEMM outputs), so the decoder's signatures stay as they are
// and a forward outside a stats step costs one null check. A block that model.recompute re-runs in backward is not
// counted twice: nothing is recorded during a re-run. Shapes: L this stage's blocks, h this rank's heads, N rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "core/parallel/tensor_parallel.h"

namespace keel::model {

// One step's forward statistics on one rank: its stage's blocks and its TP shard of heads and vocabulary. Sums are
// of this rank's elements; the trainer reduces them over the job (core/train/step_stats.h).
struct ForwardStats {
  at::Tensor attn_logit_max;  // [L, h] fp32: max over batch, query and visible key of q.k/sqrt(D); -inf unseen
  at::Tensor block_sumsq;     // [L] fp32: sum of squares of each block's output over this rank's elements
  at::Tensor logit_sum;       // [] fp32: sum of this rank's output logits (its vocabulary columns)
  at::Tensor logit_max;       // [] fp32: max of this rank's output logits; -inf unseen
  at::Tensor z_sum;           // [] fp32: sum over rows of log Z (whole vocabulary: reduced over TP)
  at::Tensor z_max;           // [] fp32: max over rows of log Z; -inf unseen
  int64_t layers = 0;         // L
  int64_t heads = 0;          // h
  int64_t layer = -1;         // the block running now (index into this stage's blocks); set by the decoder
  bool recorded_head = false;
};

// An empty accumulator for `layers` blocks of `heads` heads each on `device`.
ForwardStats make_forward_stats(int64_t layers, int64_t heads, const at::Device& device);

// While alive, the decoder's forwards on this thread record into `stats` (null: record nothing). Nests.
class ForwardStatsScope {
 public:
  explicit ForwardStatsScope(ForwardStats* stats);
  ~ForwardStatsScope();
  ForwardStatsScope(const ForwardStatsScope&) = delete;
  ForwardStatsScope& operator=(const ForwardStatsScope&) = delete;

 private:
  ForwardStats* saved_;
};

// The accumulator to record into, or null: none in scope, or a block re-run by model.recompute's backward.
ForwardStats* active_forward_stats();

// Attention of block `stats->layer`: q [B, h, T, D], k [B, h, T, D] (GQA already expanded), after RoPE/QK-norm.
void record_attention_logits(ForwardStats& stats, const at::Tensor& q, const at::Tensor& k);
// Output of block `stats->layer`: x [B, T, C] (under SP [B, T/tp, C]).
void record_block_output(ForwardStats& stats, const at::Tensor& x);
// This rank's output logits [N, V/tp]; log Z over the whole vocabulary needs the TP group (two all-reduces).
void record_logits(ForwardStats& stats, const at::Tensor& logits, const parallel::TensorParallel& tp);

}  // namespace keel::model

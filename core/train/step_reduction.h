// Why: everything the host needs from a step travels in ONE device-to-host copy: the per-rank non-finite flags,
// the losses, and the whole model's per-tensor gradient and weight squares, summed over every rank in one
// collective. Until that read the step only enqueues work (no host synchronisation inside the step on a GPU).
// This file owns that packet: the per-rank check (before any reduction mixes ranks), the gradient reductions
// every rank must run (DP mean, TP sum of partial gradients, DP mean of the losses), and the read.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/train/trainer_state.h"

namespace keel::train {

// What the host learns from one step.
struct ReducedStep {
  double loss = 0.0, z_loss = 0.0, grad_norm = 0.0;
  std::vector<float> tensor_grad_norms, tensor_param_norms;  // whole model, model order (metrics.per_tensor only)
  std::vector<float> sample_losses;                          // [global batch] per-sample mean loss, slot order
  std::string non_finite_ranks;                              // "rank 1 (dp 0, tp 1, pp 0), ..." or ""
};

class StepReduction {
 public:
  // [world]: 1 at this rank's index where its own loss or gradients are not finite. Call before reduce_grads().
  at::Tensor non_finite_flags(TrainerState& s, const at::Tensor& own_losses) const;
  // The reductions every rank runs, even on a step that will be skipped (buckets may already be in flight):
  // gradients' DP mean and TP sum of partial gradients; `losses` [2] becomes the DP mean.
  void reduce_grads(TrainerState& s, at::Tensor& losses) const;
  // The one collective and the one host read. `sample_losses` [B/dp]: this DP rank's per-sample mean losses
  // (meaningful on the last pipeline stage); the packet gathers the whole global batch's.
  ReducedStep read(TrainerState& s, const at::Tensor& flags, const at::Tensor& losses, const at::Tensor& sample_losses);

 private:
  // Per-tensor squared norms of `tensors` (this rank's, in params order), placed at their whole-model index in
  // an [n] vector on this rank's device, each element counted once: DP replicas and TP-replicated tensors
  // contribute from one rank only. Summing this vector over the world gives the whole model's squares.
  at::Tensor placed_squares(TrainerState& s, const std::vector<at::Tensor>& tensors);
  at::Tensor placement_index_, placement_counted_;  // per param: global index and counted-here flag
  at::Tensor zero_scalar_;                          // stands in for an undefined gradient on a GPU
};

}  // namespace keel::train

// Why: ZeRO stage 1 (Rajbhandari et al., 2020): the AdamW moments are twice the fp32 weights, and every DP
// replica holding all of them is the largest memory cost after activations. Here each parameter tensor gets one
// owner among the DP ranks; only the owner keeps its optimizer state and computes its update, then every rank
// receives the new values from the owner. Gradients are still all-reduced in full (GradReducer), so the update
// is exactly the replicated one, computed once.
//
// Whole tensors (not flat slices) are the unit: no tensor is split, so optimizer plugins and checkpoints keep
// seeing ordinary per-parameter state, at the cost of a coarser balance (greedy, largest first, stays within
// one tensor's size of perfect).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "core/parallel/communicator.h"

namespace keel::optim {

struct ZeroPartition {
  std::vector<int64_t> owner;  // per parameter index: the DP rank that owns its optimizer state and update
  // The parameter indices `dp_rank` owns, ascending.
  std::vector<int64_t> owned_by(int64_t dp_rank) const;
  bool owns(int64_t dp_rank, int64_t param_index) const {
    return owner.at(static_cast<size_t>(param_index)) == dp_rank;
  }
};

// Greedy, largest first (ties: lower index first), each to the least-loaded rank (ties: lower rank). Depends on
// `numels` and `dp_size` only, so every rank computes the same partition.
ZeroPartition partition_for_zero(const std::vector<int64_t>& numels, int64_t dp_size);

// After each owner updated its parameters, every DP rank gets the new values from the owner. Every broadcast
// is asynchronous and all are launched before any is waited. A parameter of at least `coalesce_below_numel`
// elements is broadcast in place (no extra memory); smaller ones (norm weights, biases) are packed into one
// flat buffer per (owner, dtype, device) so that they do not cost one collective's latency each. Every rank must
// pass the same parameter shapes and partition. DP size 1: nothing.
void broadcast_from_owners(std::vector<at::Tensor>& params, const ZeroPartition& partition, parallel::Communicator& dp,
                           int64_t coalesce_below_numel = 65536);

}  // namespace keel::optim

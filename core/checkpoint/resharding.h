// Why: a checkpoint saved by one DP x TP x PP layout must load into any other (K2-style runs change
// layout between phases). Every rank file stores its shards with their global shape and offset; this reads
// all of a checkpoint's rank files and reassembles each model and optimizer tensor whole, so that the trainer
// can cut the shard its own layout needs (core/model/sharding.h). Metadata (data ledger, config, lineage, LR
// schedule, optimizer JSON, plugin state) comes from rank 0's file, which every rank writes identically.
// Memory: the whole model and optimizer state per process — fine for the model sizes Keel trains on one
// machine; a streaming per-tensor reader is the next step for 65B-class checkpoints (docs/checkpoints.md).
#pragma once

#include <cstdint>
#include <string>

#include "core/checkpoint/manifest.h"
#include "core/checkpoint/training_state.h"

namespace keel::checkpoint {

// The full state of verified checkpoint `dir`. RNG state comes from the file of `rng_rank` (the same layout
// resumes each rank's RNG exactly); rng_rank < 0 leaves it empty. Throws CheckpointError naming the file and
// tensor when pieces overlap, leave gaps, or disagree on a tensor's global shape or dtype.
TrainingState read_full_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank);

}  // namespace keel::checkpoint

// Why: a checkpoint saved by one DP x TP x PP layout must load into any other (K2-style runs change
// layout between phases). Every rank file stores its shards with their global shape and offset. Two readers:
//   - read_full_state reads all of a checkpoint's rank files and reassembles each model and optimizer tensor
//     whole (tests, rollbacks within one run, tools that want everything);
//   - read_lazy_state reads only the rank files' metadata and returns placeholders: tensors of the global
//     shape and dtype on the meta device, holding no data. materialize() then reads exactly the part a caller
//     cuts from one (model::shard_of: this rank's TP shard) from the pieces that overlap it, by HDF5 hyperslab
//     reads, straight into the result. A resume in another layout, `keel eval`/`score` and `export-hf` use it,
//     so their peak memory is one rank's shard (or one tensor), not the whole model and optimizer state
//     (docs/checkpoints.md, "Streaming reads"; measured in docs/performance.md).
// Metadata (data ledger, config, lineage, LR schedule, optimizer JSON, plugin state) comes from rank 0's
// file, which every rank writes identically.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "core/checkpoint/manifest.h"
#include "core/checkpoint/training_state.h"

namespace keel::checkpoint {

// The full state of verified checkpoint `dir`. RNG state comes from the file of `rng_rank` (the same layout
// resumes each rank's RNG exactly); rng_rank < 0 leaves it empty. Throws CheckpointError naming the file and
// tensor when pieces overlap, leave gaps, or disagree on a tensor's global shape or dtype.
TrainingState read_full_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank);

// read_full_state's result with every model and optimizer tensor a placeholder (see above): the same checks
// on every rank file's metadata and on the pieces' shapes, dtypes and coverage, no tensor bytes read.
// Plugin tensors and RNG states (small) are read.
TrainingState read_lazy_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank);

// `t` itself when it holds data. For a placeholder of read_lazy_state, or a view of one that narrows
// dimensions (narrow, slice with step 1, model::shard_of), a new contiguous CPU tensor with exactly that
// part, bit for bit what the same view of read_full_state's tensor holds. Throws CheckpointError naming the
// tensor and file for a piece that cannot be read or a part not covered, and for a meta tensor that is not
// a placeholder (an op that copied it lost its source).
at::Tensor materialize(const at::Tensor& t);
// The same part, read into `dest` (of the view's shape): straight from the rank files into its memory when it is
// a contiguous CPU tensor of the same dtype, otherwise through a temporary; a `view` that holds data is copied.
// For a caller that already owns the destination (a parameter, an optimizer's moment): no second copy.
void materialize_into(const at::Tensor& view, const at::Tensor& dest);

// One rank file read like read_rank_file, but its model and optimizer tensors are meta tensors of their
// stored shape and dtype (no bytes read); the placement map is filled. Defined in training_state.cpp, which
// owns the rank-file layout.
TrainingState read_rank_file_shapes(const std::string& path);

}  // namespace keel::checkpoint

// Why: the model's tensor-parallel layers (core/model/tp_layers.h) need to know their shard (rank, size) and,
// when size > 1, the process group to communicate over. This handle is built by the layout code and passed to
// the model explicitly (no globals); each layer keeps a copy and declares its own split (ShardSpec). With size 1
// the layers are plain layers and no communication happens.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "core/parallel/communicator.h"

namespace keel::parallel {

struct TensorParallel {
  int64_t rank = 0;
  int64_t size = 1;
  std::shared_ptr<Communicator> group;  // the TP group (size == group->size()); null when size == 1
  // Megatron sequence parallelism (parallel.sp, size > 1): between the TP layers' matmuls the residual stream and
  // the norms hold this rank's share of the sequence, [B, T/tp, C]; see core/parallel/tp_ops.h.
  bool sequence_parallel = false;

  // Rows [begin, end) of a dimension of `full` elements owned by this rank; `what` names the dimension
  // for the error when it does not divide evenly.
  int64_t shard(int64_t full, const std::string& what) const {
    if (full % size != 0)
      throw std::invalid_argument(what + " (" + std::to_string(full) +
                                  ") is not divisible by the tensor-parallel size (" + std::to_string(size) + ")");
    return full / size;
  }
  bool single() const { return size == 1; }
  bool sp() const { return sequence_parallel && size > 1; }
};

}  // namespace keel::parallel

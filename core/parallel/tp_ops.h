// Why: Megatron's two conjugate tensor-parallel operators, the only places where the TP layers communicate
// (core/model/tp_layers.h). A column-parallel layer reads a replicated input, so each rank's gradient for that
// input is only the part its output shard contributes: copy_to_tp_region is the identity forward and sums the
// gradient over the TP group backward. A row-parallel layer produces partial sums: reduce_from_tp_region sums
// them forward and passes the (already replicated) gradient through backward. With tp.size == 1 both return
// their input untouched, with no autograd node and no communication, so single-rank runs are bit-identical.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "core/parallel/tensor_parallel.h"

namespace keel::parallel {

// x: any shape and float dtype -> the same tensor values. Backward: all-reduce SUM of the gradient over tp.group.
at::Tensor copy_to_tp_region(const at::Tensor& x, const TensorParallel& tp);

// x: any shape, this rank's partial sum -> the sum over tp.group (a new tensor). Backward: identity.
at::Tensor reduce_from_tp_region(const at::Tensor& x, const TensorParallel& tp);

// Sequence parallelism (Megatron SP) replaces the pair above around the TP region: the column-parallel layers read
// the sequence gathered from every rank, the row-parallel ones scatter their sum back over the sequence. Dim 1 is
// the sequence (T), split in tp.size equal contiguous parts, rank r holding part r.
// x: [B, T/tp, ...] this rank's part -> [B, T, ...] every rank's part in rank order. Backward: reduce-scatter (the
// gradient summed over the group, this rank's part kept).
at::Tensor gather_from_sequence_region(const at::Tensor& x, const TensorParallel& tp);
// x: [B, T, ...] this rank's partial sum -> [B, T/tp, ...] this rank's part of the sum over the group (T must
// divide by tp.size). Backward: all-gather.
at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& x, const TensorParallel& tp);

// Throws std::invalid_argument naming `who` unless tp describes a usable group: size 1, or a group of
// tp.size ranks in which this process is rank tp.rank.
void require_tp_group(const TensorParallel& tp, const std::string& who);

}  // namespace keel::parallel

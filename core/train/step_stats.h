// Why: the instability precursors of metrics.stats_every (docs/metrics.md) are spread over the job: each pipeline
// stage saw its own blocks, each TP rank its heads, vocabulary columns and weight shards, each DP rank its slice of
// the batch, each ZeRO owner its optimizer state. This stage gathers them into the whole model's rows with two
// all-reduces (a max and a sum) on stats steps only, hands them to plugins (StepContext::activation_stats, the
// on_stats hook) and to metrics.h5 (/stats/, rank 0, one host read). Off (stats_every = 0) nothing here runs.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "core/model/forward_stats.h"
#include "core/train/trainer_state.h"

namespace keel::train {

// True on the steps metrics.stats_every asks for (step 0, N, 2N, ...); never when it is 0.
bool stats_due(const Config& config, int64_t step);
// This rank's empty forward accumulator: its stage's blocks, its TP share of heads, on the training device.
model::ForwardStats begin_forward_stats(const TrainerState& s);
// The weights before the optimizer step (fp32 copies of this rank's parameters), for the update-to-weight ratio.
std::vector<torch::Tensor> snapshot_weights(const TrainerState& s);
// After the optimizer step: reduces the forward statistics, the update ratios and the optimizer's second-moment
// statistics over the job, fills r.ctx.activation_stats on every rank (the whole model's rows, on the device) and,
// on rank 0, buffers the /stats row of metrics.h5.
void collect_stats(TrainerState& s, StepRecord& r, const model::ForwardStats& forward,
                   const std::vector<torch::Tensor>& weights_before);

}  // namespace keel::train

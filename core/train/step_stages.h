// Why: the stages of one training step, each a named function, so that Trainer::train_step reads top to
// bottom like llm.c's loop: context -> step-start hooks (mixture, LR) -> batch -> forward/backward through the
// pipeline -> the one-packet reduction (step_reduction.h) -> gradient transforms -> step decision -> optimizer
// step -> step end (metrics row, observers). Every plugin hook is called through TrainerState::call() and every
// value a plugin returns is checked at that boundary (plugin_values.h).
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "core/model/forward_stats.h"
#include "core/train/step_reduction.h"
#include "core/train/trainer_state.h"

namespace keel::train {

// The step's context as plugins see it: the step, counters, layout and kernels (the rest is filled stage by
// stage).
sdk::StepContext begin_context(const TrainerState& s, int64_t step);
// 0. step start: the data mixture plugin may change the weights from this step on; then the LR (schedule,
// lr_schedule plugin, a spike handler's LR factor).
void run_step_start_hooks(TrainerState& s, sdk::StepContext& ctx);
// 1. batch: plans the whole global batch (a pure function of seed, data config, ledger and step) and returns
// this DP rank's contiguous slice on the device, [B/dp, T+1]; fills ctx.batch and ctx.tokens.
torch::Tensor load_batch(TrainerState& s, sdk::StepContext& ctx);
// 2. loss: forward + backward of the micro-batches through the pipeline stages (one stage when pp = 1); fp32
// gradients accumulate in this rank's master weights. Returns [loss, z_loss] (the mean over micro-batches),
// this rank's own in `own_losses` (zeros before the last stage) and broadcast from the last stage in the result.
// `sample_losses` [B/dp]: each sample's mean token loss, from the head's per-token losses (no extra forward;
// zeros before the last stage).
// `stats` (a metrics.stats_every step, else null): the decoder records its forward statistics into it.
torch::Tensor forward_backward(TrainerState& s, const torch::Tensor& window, torch::Tensor& own_losses,
                               torch::Tensor& sample_losses, model::ForwardStats* stats = nullptr);
// 3. grads: the per-rank non-finite check, the reductions, the one host read; fills ctx's loss and norms and
// clips. Returns who saw a non-finite value ("" if nobody).
std::string reduce_and_clip(TrainerState& s, StepReduction& reduction, StepRecord& r, const torch::Tensor& own_losses,
                            torch::Tensor& losses, const torch::Tensor& sample_losses);
// 4. gradient transforms, in chain order (each rank transforms its own shards).
void transform_grads(TrainerState& s, sdk::StepContext& ctx);
// 5. step decision: a non-finite loss or gradient never reaches the weights; then the spike handler, run on
// every rank; rank 0's decision is the one all apply. Applies an LR factor and logs skips and stops.
void decide(TrainerState& s, StepRecord& r, const std::string& non_finite_ranks);
// 6. optimizer step, unless the update is skipped (ZeRO-1: each DP rank its share, then a broadcast).
void apply_update(TrainerState& s, StepRecord& r);
// 7. step end: the step counts from here on; the metrics row, then every plugin's on_step_end (and on a stats
// step, ctx.activation_stats filled, every plugin's on_stats).
void end_step(TrainerState& s, StepRecord& r, std::chrono::steady_clock::time_point start);

}  // namespace keel::train

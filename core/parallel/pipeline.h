// Why: pipeline parallelism's schedule, apart from the model. A stage is "a forward of micro-batch m given the
// previous stage's activation"; this file decides the order of forwards and backwards on every stage and moves
// activations (forward) and their gradients (backward) between neighbouring stages over the PP communicator.
// The model knows only which blocks its stage holds (model::StageSpec) and offers embed / run_blocks / head_loss;
// schedules, micro-batches and neighbours live here alone, and the trainer's step loop stays one call.
//
// Two schedules (docs/parallel.md; Megatron-Core's forward_backward_pipelining_without_interleaving):
//   gpipe: every forward, then every backward. Simple; all M micro-batches' activations are alive at once.
//   1f1b:  stage s runs W = min(P - s - 1, M) warm-up forwards, then alternates one forward / one backward,
//          then W cool-down backwards. The bubble is the same as GPipe's, but at most P - s micro-batches'
//          activations are alive on stage s, whatever M is: memory no longer grows with the micro-batch count.
// Both run micro-batch backwards in the order 0, 1, ..., M-1 on every stage, so gradients accumulate in the
// same order as the single-process gradient-accumulation loop (bit-identical results in fp32).
//
// Deadlock freedom: every send is asynchronous (its PendingWork is kept and waited before returning) and every
// receive blocks, so a stage only ever waits for a value its neighbour produces before waiting itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/parallel/communicator.h"

namespace keel::parallel {

// parallel.schedule, parsed once by the config (config.h: name_of gives "1f1b" | "gpipe").
using keel::PipelineSchedule;

struct PipelineStage {
  // Forward of micro-batch `micro` on this stage. `input` is the previous stage's activation (a leaf that
  // requires grad) or an undefined tensor on the first stage. Returns the activation for the next stage,
  // or on the last stage the scalar loss to differentiate (already scaled by the caller).
  std::function<at::Tensor(int64_t micro, const at::Tensor& input)> forward;
  std::vector<int64_t> activation_shape;  // [b, T, C], the same for every micro-batch
  at::ScalarType activation_dtype = at::kFloat;
  at::Device device = at::Device(at::kCPU);
  // Optional: called just before micro-batch `micro`'s backward on this stage (e.g. to arm
  // GradReducer::prepare_overlap() before the last one, micro == microbatches - 1).
  std::function<void(int64_t micro)> before_backward;
};

// What one run_pipeline call did on this stage (for tests and memory accounting).
struct PipelineRunStats {
  int64_t warmup_forwards = 0;  // forwards run before the first backward
  int64_t peak_in_flight = 0;   // most micro-batches whose activations were alive at once
};

// Micro-batch `micro`'s tags on the PP group. A send and its receive use the same tag; the direction is part of
// it so that an activation and a gradient can never pair with each other.
inline int64_t activation_tag(int64_t micro) { return 2 * micro; }
inline int64_t gradient_tag(int64_t micro) { return 2 * micro + 1; }

// Runs forward and backward of `microbatches` micro-batches; gradients accumulate in the parameters' .grad.
// pp.size() == 1: forward then backward per micro-batch (the plain gradient-accumulation loop), either schedule.
// On a failure (a forward throws, a neighbour times out) the error propagates; sends still in flight are
// abandoned, and the neighbours fail at their own receive timeout: the process must exit.
PipelineRunStats run_pipeline(const PipelineStage& stage, int64_t microbatches, Communicator& pp,
                              PipelineSchedule schedule);

}  // namespace keel::parallel

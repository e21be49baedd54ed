// Why: see pipeline.h. One StageRunner per run_pipeline call holds the micro-batches in flight on this stage
// (input leaf + output, until their backward) and the sends not yet known to be received; the schedule itself
// is three loops (warm-up forwards, steady one-forward-one-backward, cool-down backwards).
#include "core/parallel/pipeline.h"

#include <torch/torch.h>

#include <algorithm>
#include <deque>
#include <stdexcept>

namespace keel::parallel {

namespace {

std::string shape_string(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// One micro-batch between its forward and its backward on this stage.
struct InFlight {
  int64_t micro = 0;
  at::Tensor input;   // [b, T, C] leaf that requires grad (undefined on the first stage)
  at::Tensor output;  // [b, T, C] activation sent on, or [] / [1] loss on the last stage
};

class StageRunner {
 public:
  StageRunner(const PipelineStage& stage, int64_t microbatches, Communicator& pp)
      : stage_(stage),
        microbatches_(microbatches),
        pp_(pp),
        first_(pp.rank() == 0),
        last_(pp.rank() == pp.size() - 1),
        activation_options_(at::TensorOptions().dtype(stage.activation_dtype).device(stage.device)) {
    activation_sends_.resize(static_cast<size_t>(microbatches));
  }

  void forward_step() {
    const int64_t micro = next_forward_++;
    at::Tensor input;  // [b, T, C]
    if (!first_) {
      input = at::empty(stage_.activation_shape, activation_options_);
      pp_.recv(input, pp_.rank() - 1, activation_tag(micro));
      input.requires_grad_(true);
    }
    at::Tensor output = stage_.forward(micro, input);  // [b, T, C], or the loss on the last stage
    TORCH_CHECK(output.defined(), "pipeline stage ", pp_.rank(), ": forward of micro-batch ", micro,
                " returned an undefined tensor");
    TORCH_CHECK(output.requires_grad(), "pipeline stage ", pp_.rank(), ": forward of micro-batch ", micro,
                " returned a tensor that does not require grad (is grad mode off?)");
    if (last_) {
      TORCH_CHECK(output.numel() == 1, "last pipeline stage: forward must return the scalar loss, got shape ",
                  shape_string(output.sizes()));
    } else {
      TORCH_CHECK(output.sizes() == at::IntArrayRef(stage_.activation_shape), "pipeline stage ", pp_.rank(),
                  ": forward of micro-batch ", micro, " returned shape ", shape_string(output.sizes()),
                  ", the stage declares activation_shape ", shape_string(stage_.activation_shape));
      // The receiver's buffer has activation_dtype; a differentiable cast keeps both ends in agreement.
      if (output.scalar_type() != stage_.activation_dtype) output = output.to(stage_.activation_dtype);
      activation_sends_[static_cast<size_t>(micro)] = pp_.send(output.detach(), pp_.rank() + 1, activation_tag(micro));
    }
    in_flight_.push_back(InFlight{micro, std::move(input), std::move(output)});
    stats_.peak_in_flight = std::max<int64_t>(stats_.peak_in_flight, static_cast<int64_t>(in_flight_.size()));
  }

  void backward_step() {
    TORCH_CHECK(!in_flight_.empty(), "pipeline schedule bug: backward with no micro-batch in flight");
    InFlight item = std::move(in_flight_.front());
    in_flight_.pop_front();
    const int64_t micro = item.micro;
    if (last_) {
      if (stage_.before_backward) stage_.before_backward(micro);
      item.output.backward();
    } else {
      at::Tensor output_grad = at::empty(stage_.activation_shape, activation_options_);  // [b, T, C]
      pp_.recv(output_grad, pp_.rank() + 1, gradient_tag(micro));
      // The next stage has consumed this micro-batch's activation (it sent back its gradient): the send is done.
      activation_sends_[static_cast<size_t>(micro)].wait();
      if (stage_.before_backward) stage_.before_backward(micro);
      item.output.backward(output_grad);
    }
    if (!first_) {
      at::Tensor input_grad = item.input.grad();  // [b, T, C]
      if (!input_grad.defined()) input_grad = at::zeros(stage_.activation_shape, activation_options_);
      // At most two gradient sends in flight: the previous one has almost surely met its receive by now (the
      // previous stage waits for it), and waiting for it is safe: that receive depends only on gradients this
      // stage has already sent.
      if (previous_gradient_send_.pending()) previous_gradient_send_.wait();
      previous_gradient_send_ = std::move(last_gradient_send_);
      last_gradient_send_ = pp_.send(input_grad, pp_.rank() - 1, gradient_tag(micro));
    }
    ++backwards_done_;
    // `item` goes out of scope here: this micro-batch's graph and saved activations are freed.
  }

  PipelineRunStats finish() {
    for (auto& send : activation_sends_) send.wait();
    previous_gradient_send_.wait();
    last_gradient_send_.wait();
    TORCH_CHECK(in_flight_.empty() && backwards_done_ == microbatches_, "pipeline schedule bug: ", in_flight_.size(),
                " micro-batches still in flight");
    return stats_;
  }

  PipelineRunStats& stats() { return stats_; }

 private:
  const PipelineStage& stage_;
  const int64_t microbatches_;
  Communicator& pp_;
  const bool first_, last_;
  const at::TensorOptions activation_options_;
  std::deque<InFlight> in_flight_;             // oldest first: backwards run in micro-batch order
  std::vector<PendingWork> activation_sends_;  // [microbatches], waited once the gradient comes back
  PendingWork previous_gradient_send_, last_gradient_send_;
  int64_t next_forward_ = 0;
  int64_t backwards_done_ = 0;
  PipelineRunStats stats_;
};

}  // namespace

PipelineRunStats run_pipeline(const PipelineStage& stage, int64_t microbatches, Communicator& pp,
                              PipelineSchedule schedule) {
  TORCH_CHECK(microbatches >= 1, "run_pipeline: microbatches must be >= 1, got ", microbatches);
  TORCH_CHECK(static_cast<bool>(stage.forward), "run_pipeline: the stage has no forward");
  TORCH_CHECK(pp.single() || !stage.activation_shape.empty(), "run_pipeline: the stage has no activation_shape");
  c10::AutoGradMode grad_mode(true);

  const int64_t stages = pp.size();
  const int64_t stage_index = pp.rank();
  int64_t warmup = 0;  // one stage: forward then backward per micro-batch, whatever the schedule
  if (stages > 1) {
    warmup = schedule == PipelineSchedule::kGPipe ? microbatches : std::min(stages - stage_index - 1, microbatches);
  }

  StageRunner runner(stage, microbatches, pp);
  runner.stats().warmup_forwards = warmup;
  for (int64_t i = 0; i < warmup; ++i) runner.forward_step();
  for (int64_t i = 0; i < microbatches - warmup; ++i) {
    runner.forward_step();
    runner.backward_step();
  }
  for (int64_t i = 0; i < warmup; ++i) runner.backward_step();
  return runner.finish();
}

}  // namespace keel::parallel

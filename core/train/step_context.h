// Why: the read-only record of one training step that each stage of train_step() fills in and the next reads.
// It is the seed of the plugin SDK's step context (DESIGN.md: "ctx"): hooks will receive exactly this.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace keel::train {

enum class StepDecision { kContinue, kSkipUpdate, kStop };

struct StepContext {
  int64_t step = 0;             // 0-based index of this optimizer step
  int64_t tokens_before = 0;    // tokens consumed by earlier steps
  int64_t tokens = 0;           // tokens in this step's global batch
  double lr = 0.0;
  double loss = 0.0;            // mean token NLL over the global batch (fp32)
  double z_loss = 0.0;          // z-loss term (0 when disabled)
  double grad_norm = 0.0;       // global L2 norm before clipping
  double clip_factor = 1.0;     // factor applied to the gradients by clipping
  std::vector<float> tensor_grad_norms;   // per parameter tensor, model order
  std::vector<float> tensor_param_norms;  // per parameter tensor, after the update
  std::vector<std::string> sources;       // source name of every sample in the batch
  StepDecision decision = StepDecision::kContinue;
  std::string decision_reason;
  double step_time_s = 0.0;
};

}  // namespace keel::train

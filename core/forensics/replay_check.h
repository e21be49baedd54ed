// Why: a Keel step is bit-exact and replayable, so a replayed step that differs from its logged row means
// nondeterminism, a changed build or corrupted data or checkpoint — what Megatron's rerun machine checks for one
// step, here for any number. This file holds the comparison both users share: `keel verify` (a replay in a
// scratch dir, compared with the run's metrics.h5 afterwards) and `resume.verify_steps` (a resume compares each of
// its first K steps with the parent's logged row as it goes). Compared bit for bit: loss, grad norm, every
// per-tensor gradient and weight norm, and every sample's loss. Plain C++ over MetricsReader: no LibTorch.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace keel::forensics {

// What metrics.h5 says about one step (the values a replay must reproduce).
struct LoggedStep {
  int64_t step = -1;
  double loss = 0.0;
  double grad_norm = 0.0;
  std::vector<float> tensor_grad_norms, tensor_param_norms;  // model order; empty when the run logged none
  std::vector<float> sample_losses;                          // slot order; empty when the run logged none
};

struct LoggedRun {
  std::string path;                       // the metrics.h5 read
  std::vector<std::string> tensor_names;  // columns of the per-tensor norms
  std::map<int64_t, LoggedStep> steps;    // by step; a step run twice (rollback) keeps its later row, as it counts
};

// Reads every logged step of `metrics_h5` (rows up to the length of /train/step). Throws std::runtime_error naming
// the file when it cannot be read.
LoggedRun read_logged_run(const std::string& metrics_h5);

// The first value of a step that differs.
struct Mismatch {
  int64_t step = -1;
  // "loss", "grad_norm", "tensor_grad_norm NAME", "tensor_param_norm NAME" or "sample_loss slot I"
  std::string what;
  std::string logged, replayed;  // the two values, printed with every digit (%.17g / %.9g)
};

// Compares the values both sides have, bit for bit (a NaN equals the same NaN); per-tensor norms and sample losses
// only when both logged them. `tensor_names` names the per-tensor columns in the message. nullopt when identical.
std::optional<Mismatch> compare_step(const LoggedStep& logged, const LoggedStep& replayed,
                                     const std::vector<std::string>& tensor_names);

// "step 12: loss differs (logged 5.4321..., replayed 5.4322...)"
std::string describe(const Mismatch& m);

// resume.verify_steps = K: the parent's logged rows of steps [first_step, first_step + K), read once at the
// resume's first step. check() throws std::runtime_error naming the step, the value and the parent's file when a
// step's row differs; a step the parent never logged is not checked (the overlap ends there).
class ReplayCheck {
 public:
  ReplayCheck(const std::string& parent_metrics_h5, int64_t first_step, int64_t steps);
  // Whether `step` is one this check compares (in the window and logged by the parent).
  bool covers(int64_t step) const;
  void check(const LoggedStep& replayed) const;
  int64_t overlap() const { return static_cast<int64_t>(expected_.steps.size()); }
  int64_t first_step() const { return first_step_; }

 private:
  LoggedRun expected_;  // only the steps in the window
  int64_t first_step_ = 0;
};

}  // namespace keel::forensics

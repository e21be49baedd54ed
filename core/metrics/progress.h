// Why: the console line is what a researcher watches during a run, so it must be compact, stable in shape
// and honest about throughput. Formatting is a pure function (unit-tested, no clock, no logging): the trainer
// feeds it numbers and prints the result with spdlog. Throughput and ETA come from ThroughputMeter, an
// exponential moving average that ignores the slow first steps' spike quickly but does not jump around
// step to step. Plain C++: no LibTorch.
#pragma once

#include <cstdint>
#include <string>

namespace keel::metrics {

// Steps are numbered from 0 everywhere (progress line, log lines, events, metrics.h5): the line of the step with
// index 119 says "step 119", as /train/step does, and "(120/1000)" counts the steps done out of train.steps.
struct ProgressInfo {
  int64_t step = 0;         // the index of the step just finished (0-based, as in metrics.h5)
  int64_t total_steps = 0;  // train.steps; <= 0: unknown, printed as "step 119"
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  double tokens_per_s = 0.0;  // <= 0 or non-finite: printed as "-- tok/s"
  double eta_s = -1.0;        // < 0 or non-finite: printed as "ETA --"
  bool skipped = false;       // appends " | skipped"
};

// "step 119 (120/1000) | loss 5.4321 | gnorm 0.812 | lr 2.1e-04 | 12.3K tok/s | ETA 1m12s"
std::string format_progress(const ProgressInfo& info);

// Seconds as "45s", "1m12s", "2h05m", "3d04h"; "--" for negative or non-finite input. Rounds down.
std::string format_duration(double seconds);

// A rate or count with an SI suffix and one decimal: "850", "12.3K", "4.5M", "1.2G"; "--" if not finite.
std::string format_si(double value);

// Exponential moving average of step time and tokens per step. tokens_per_s() is the ratio of the two
// averages (not an average of ratios), so one slow step weighs by its duration, as it should.
class ThroughputMeter {
 public:
  // alpha: weight of the newest step, in (0, 1]. The first update() initializes the averages.
  explicit ThroughputMeter(double alpha = 0.1);

  // One finished step: its wall time in seconds and the tokens it processed (over all ranks).
  void update(double step_time_s, double tokens);
  void reset();

  bool has_data() const { return count_ > 0; }
  int64_t count() const { return count_; }
  double step_time_s() const { return step_time_s_; }  // smoothed; 0 before the first update
  double tokens_per_s() const;                         // smoothed; 0 before the first update
  // Smoothed seconds left for `remaining_steps`; -1 before the first update.
  double eta_s(int64_t remaining_steps) const;

 private:
  double alpha_;
  int64_t count_ = 0;
  double step_time_s_ = 0.0;
  double tokens_ = 0.0;
};

}  // namespace keel::metrics

// Why: the three built-in spike handlers (zscore_skip, rollback_skip, lr_cooldown) detect a loss spike the same
// way and differ only in what they do about it, so the detection lives here once, header-only (this folder has
// no CMakeLists.txt: it is not a plugin, plugins/CMakeLists.txt only builds folders that have one).
//
// Detection, exactly: two rolling windows hold the last `window` losses and the last `window` global grad norms
// (ctx.loss, ctx.grad_norm — the norm before clipping) of steps that were not spikes. A step is a spike when
//   - its loss or grad norm is not finite (always, even before the window has filled: NaN must never enter it), or
//   - the window holds at least `min_history` values and the z-score z = (x - mean) / std of the loss or of the
//     grad norm is above `threshold`. mean and std are over the window, std is the population standard
//     deviation (divide by n, as llm.c's outlier detector), floored at kRelativeStdFloor * |mean| +
//     kAbsoluteStdFloor so that a perfectly flat window (std = 0) still flags a real jump instead of dividing by
//     zero (llm.c returns z = 0 there and so never fires on a flat window). Only upward deviations count: a
//     sudden drop of the loss is not a spike.
// A spike never enters the windows (a skipped step, a rolled-back step, or one the handler let through), so one
// outlier does not widen the std and hide the next one. Unlike OLMo-core's and llm.c's detectors the windows
// are saved in the checkpoint (as float64 tensors "loss_window" and "grad_norm_window", oldest first) and restored
// on resume, so a resumed run makes the same decisions as an uninterrupted one.
// Arguments (common to the three handlers): window (50), min_history (10), threshold (6.0).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "keel/plugin.h"

namespace keel::plugins {

// The std floor of the z-score: relative to the window's mean, plus an absolute epsilon for a mean of 0.
inline constexpr double kRelativeStdFloor = 1e-4;
inline constexpr double kAbsoluteStdFloor = 1e-12;

// "%.6g" of a double, for messages.
inline std::string short_number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.6g", v);
  return text;
}

// The last `capacity` values of one metric (oldest first) and the z-score of a new value against them.
class RollingWindow {
 public:
  explicit RollingWindow(size_t capacity) : capacity_(capacity) {}

  void push(double value) {
    values_.push_back(value);
    while (values_.size() > capacity_) values_.pop_front();
  }
  size_t size() const { return values_.size(); }
  double mean() const {
    double sum = 0.0;
    for (double v : values_) sum += v;
    return values_.empty() ? 0.0 : sum / static_cast<double>(values_.size());
  }
  // Population standard deviation (divides by n).
  double stddev() const {
    if (values_.empty()) return 0.0;
    const double m = mean();
    double sum_sq = 0.0;
    for (double v : values_) sum_sq += (v - m) * (v - m);
    return std::sqrt(sum_sq / static_cast<double>(values_.size()));
  }
  // The std the z-score divides by: never below the floor described at the top of this file.
  double floored_stddev() const {
    return std::max(stddev(), kRelativeStdFloor * std::fabs(mean()) + kAbsoluteStdFloor);
  }
  double zscore(double value) const { return (value - mean()) / floored_stddev(); }

  // float64 [n], oldest first.
  at::Tensor to_tensor() const {
    return at::tensor(std::vector<double>(values_.begin(), values_.end()), at::TensorOptions().dtype(at::kDouble));
  }
  // Replaces the values by `values` (any floating dtype, 1-D); keeps the newest `capacity` if there are more.
  void assign(const at::Tensor& values, const std::string& name) {
    if (values.dim() != 1 || !values.is_floating_point()) {
      throw std::runtime_error("plugin state tensor '" + name + "' must be a 1-D floating-point tensor, got " +
                               std::to_string(values.dim()) + "-D " + std::string(values.dtype().name()));
    }
    const at::Tensor v = values.to(at::kCPU, at::kDouble).contiguous();  // [n]
    values_.clear();
    const double* data = v.data_ptr<double>();
    for (int64_t i = 0; i < v.numel(); ++i) {
      if (!std::isfinite(data[i])) {
        throw std::runtime_error("plugin state tensor '" + name + "' holds a non-finite value at " + std::to_string(i));
      }
      push(data[i]);
    }
  }

 private:
  size_t capacity_;
  std::deque<double> values_;
};

struct SpikeDetectorOptions {
  int64_t window = 50;
  int64_t min_history = 10;
  double threshold = 6.0;
};

// Reads and checks window, min_history and threshold; errors name the plugin and the argument.
inline SpikeDetectorOptions spike_detector_options(const sdk::Args& args, const std::string& plugin) {
  SpikeDetectorOptions o;
  o.window = sdk::arg_int(args, "window", o.window);
  o.min_history = sdk::arg_int(args, "min_history", o.min_history);
  o.threshold = sdk::arg_double(args, "threshold", o.threshold);
  if (o.window < 2) {
    throw std::invalid_argument(plugin + ": argument 'window' must be >= 2, got " + std::to_string(o.window));
  }
  if (o.min_history < 2 || o.min_history > o.window) {
    throw std::invalid_argument(plugin + ": argument 'min_history' must be in [2, window = " +
                                std::to_string(o.window) + "], got " + std::to_string(o.min_history));
  }
  if (!(o.threshold > 0) || !std::isfinite(o.threshold)) {
    throw std::invalid_argument(plugin + ": argument 'threshold' must be a finite number > 0, got " +
                                short_number(o.threshold));
  }
  return o;
}

// One step's spike: the worst metric (largest z-score; inf for a non-finite value) and a sentence for the log.
struct Spike {
  std::string metric;  // "loss" or "grad_norm"
  double value = 0.0;
  double zscore = 0.0;
  std::string reason;  // every offending metric, e.g. "loss 9.5 has z-score 700.2 > 6 (mean 2.5, std 0.01, n 30)"
};

class SpikeDetector {
 public:
  explicit SpikeDetector(const SpikeDetectorOptions& options)
      : options_(options),
        loss_(static_cast<size_t>(options.window)),
        grad_norm_(static_cast<size_t>(options.window)) {}

  const SpikeDetectorOptions& options() const { return options_; }
  size_t history() const { return loss_.size(); }

  // The spike in ctx's loss or grad norm, or nothing. Emits the z-scores as metrics ("loss_zscore",
  // "grad_norm_zscore") once the window is long enough, and records the step in the windows if it is no spike.
  std::optional<Spike> observe(const sdk::StepContext& ctx) {
    std::optional<Spike> spike;
    check_metric("loss", ctx.loss, loss_, ctx, spike);
    check_metric("grad_norm", ctx.grad_norm, grad_norm_, ctx, spike);
    if (!spike) {
      loss_.push(ctx.loss);
      grad_norm_.push(ctx.grad_norm);
    }
    return spike;
  }

  void save(sdk::PluginState& state) const {
    state.tensors.emplace_back("loss_window", loss_.to_tensor());
    state.tensors.emplace_back("grad_norm_window", grad_norm_.to_tensor());
  }
  // A state without the windows (none saved yet) leaves them empty.
  void load(const sdk::PluginState& state) {
    for (const auto& [name, tensor] : state.tensors) {
      if (name == "loss_window") loss_.assign(tensor, name);
      if (name == "grad_norm_window") grad_norm_.assign(tensor, name);
    }
    if (loss_.size() != grad_norm_.size()) {
      throw std::runtime_error("plugin state: 'loss_window' and 'grad_norm_window' differ in length (" +
                               std::to_string(loss_.size()) + " vs " + std::to_string(grad_norm_.size()) + ")");
    }
  }

 private:
  void check_metric(const std::string& metric, double value, const RollingWindow& window, const sdk::StepContext& ctx,
                    std::optional<Spike>& spike) const {
    double z = 0.0;
    std::string why;
    if (!std::isfinite(value)) {
      z = std::numeric_limits<double>::infinity();
      why = metric + " is " + short_number(value) + " (not finite)";
    } else {
      if (window.size() < static_cast<size_t>(options_.min_history)) return;
      z = window.zscore(value);
      ctx.metric(metric + "_zscore", z);
      if (!(z > options_.threshold)) return;
      why = metric + " " + short_number(value) + " has z-score " + short_number(z) + " > " +
            short_number(options_.threshold) + " (mean " + short_number(window.mean()) + ", std " +
            short_number(window.stddev()) + " over the last " + std::to_string(window.size()) + " steps)";
    }
    if (!spike) {
      spike = Spike{metric, value, z, why};
      return;
    }
    spike->reason += "; " + why;
    if (z > spike->zscore) {
      spike->metric = metric;
      spike->value = value;
      spike->zscore = z;
    }
  }

  SpikeDetectorOptions options_;
  RollingWindow loss_;
  RollingWindow grad_norm_;
};

}  // namespace keel::plugins

// Why: `keel forensics RUN --step N` answers "which samples made step N spike, and what is the least to skip?".
// A Keel step is replayable, so the model state before step N can be rebuilt exactly from a checkpoint; this file
// holds what is done with it: each sample of the step's batch gets its own forward and backward (its mean token
// loss and the gradient of its loss), the gradients are kept as their Gram matrix, and from that the loss and
// gradient norm of the step without any subset of its samples follow exactly (the step's loss is the plain mean
// of its samples' losses, every sample having seq_len target tokens, so its gradient is the mean of theirs). A
// search then finds the smallest set of samples whose removal brings the step within the spike detector's
// threshold (zscore_skip's rule over the run's logged history), and the set becomes a skip list in the data.skip
// format that `keel resume --skip-list` honours. Cost: B forward+backward passes of one sample each and B x P fp32
// gradients in memory (B samples, P parameters) — meant for the small models that study spikes, refused above a
// memory cap. docs/forensics.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/forensics/replay_check.h"
#include "core/model/llama.h"

namespace keel::forensics {

// The spike detector's rule (plugins/common/spike_window.h, the zscore_skip defaults): the logged steps before N
// go through a rolling window of the last `window` non-spike steps; a step is a spike when the window holds at
// least `min_history` values and its loss or grad norm z-score (population std, floored at 1e-4 |mean| + 1e-12)
// exceeds `z`. The threshold of step N is mean + z * std of that window, for the loss and for the grad norm.
struct Threshold {
  bool defined = false;  // false: fewer than min_history steps in the window (no explicit maximum given either)
  int64_t history = 0;   // values in the window at step N
  double max_loss = 0.0, max_grad_norm = 0.0;
  double loss_mean = 0.0, loss_std = 0.0, grad_mean = 0.0, grad_std = 0.0;
  std::string rule;  // how it was set, for the report: "zscore 6 over the last 50 non-spike steps (12 values)"
};

struct ThresholdOptions {
  int64_t window = 50, min_history = 10;
  double z = 6.0;
  std::optional<double> max_loss, max_grad_norm;  // explicit maxima replace the z-score's
};

// The threshold of `step` from `run`'s logged steps before it. Explicit maxima in `o` replace the computed ones.
Threshold spike_threshold(const LoggedRun& run, int64_t step, const ThresholdOptions& o);

// What each sample of the batch contributed. Slot order.
struct SampleGradients {
  int64_t samples = 0;                 // B
  int64_t parameters = 0;              // P
  std::vector<double> loss;            // [B] mean token NLL of each sample (as /data/sample_loss)
  std::vector<double> gram;            // [B * B] <g_i, g_j>, g_i the gradient of sample i's loss (NLL + z-loss)
  double batch_grad_norm() const;      // |mean_i g_i|: the step's gradient norm before clipping
  double grad_norm(int64_t i) const;   // |g_i|
  double grad_share(int64_t i) const;  // <g_i / B, u>, u the batch gradient's direction: sums to the norm
  double subset_loss(const std::vector<bool>& removed) const;       // mean loss of the samples kept
  double subset_grad_norm(const std::vector<bool>& removed) const;  // |mean of the kept g_i|
};

// The per-sample forward and backward of `windows` [B, T+1] (int64) through `model` in `compute_dtype`: B passes.
// Throws std::runtime_error when B x P x 4 bytes exceeds `max_bytes` (the gradients held at once).
SampleGradients per_sample_gradients(const model::Llama& model, const torch::Tensor& windows,
                                     torch::ScalarType compute_dtype, int64_t max_bytes);

struct SearchStep {
  int64_t removed = -1;  // the slot removed at this step of the search (-1: the full batch)
  double loss = 0.0, grad_norm = 0.0;
};

struct SearchResult {
  bool within_at_start = false;   // the full batch is already within the threshold
  bool reached = false;           // a removal set brings it within
  std::vector<int64_t> removed;   // slots, ascending: the smallest set found
  std::vector<SearchStep> trace;  // the greedy removals, in order, then the final set's values
  std::string method;             // "exhaustive over sets of up to K samples" or "greedy, then pruned"
};

// The smallest set of samples whose removal brings the batch's loss to <= max_loss and its grad norm to <=
// max_grad_norm (at least one sample is kept). Greedy: remove the sample whose removal lowers the larger of the two
// relative excesses most, until within; then put back every removed sample the set does not need (pruning); then
// every smaller set is tried exhaustively while that is at most 10^6 subsets, so the result is the smallest set for
// batches of the sizes forensics is used at.
SearchResult search_removal(const SampleGradients& g, double max_loss, double max_grad_norm);

// A sample of the batch, as /data/batch recorded it.
struct BatchSample {
  int64_t slot = 0;
  int32_t source = 0;
  int64_t sample_id = 0, epoch = 0, chunk = 0;
};

// The skip list of a removal set, in data.skip form: a (source, chunk) becomes "SRC:chunk:C" when every sample of
// the batch from that chunk is removed and there are at least two of them; the other removed samples become
// "SRC:samples:A-B" ranges of consecutive sample ids. Sorted by source, then chunk / first id.
std::vector<std::string> skip_specs(const std::vector<BatchSample>& batch, const std::vector<int64_t>& removed,
                                    const std::vector<std::string>& sources);

}  // namespace keel::forensics

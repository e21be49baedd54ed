// Why: the report's stability view. A loss spike is read backwards: what moved before it (the instability
// precursors of metrics.stats_every, /stats/ in metrics.h5, drawn as layer x step heatmaps) and what the run did
// about it (the spike handlers' events, with the z-score they quote and the sources whose loss rose most in that
// step, from /train/source_loss). Both are computed here, torch-free, so that tests check the numbers the page
// shows without a browser; the page only draws them.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/metrics/metrics_reader.h"

namespace keel::report {

struct RunData;

// /stats/ of one run, the last row of each stats step (a rollback's re-run replaces the earlier row).
struct PrecursorStats {
  std::vector<int64_t> steps;                       // S stats steps, ascending
  std::vector<std::vector<double>> attn_logit_max;  // [L][S]: per layer the max over its heads
  std::vector<std::vector<double>> block_rms;       // [L][S]
  std::vector<double> z_max;                        // [S]
  bool empty() const { return steps.empty(); }
};

// Reads /stats/ (empty when the run logged none). Throws std::runtime_error naming the file when /stats/step
// exists but a series disagrees with it (rows, or columns that are not layers x heads).
PrecursorStats read_precursors(const metrics::MetricsReader& reader);

// One row of the spike table: an event of a step decision (skip, rollback, stop, lr_factor).
struct SpikeRow {
  int64_t step = 0;
  std::string detector;  // the plugin that decided ("[name] ..." or "(name: ..." in the text), else "keel"
  std::string action;    // the event kind
  double z = 0.0;        // the first "z-score X" the text quotes; NaN when it quotes none
  std::string text;
  // The sources of the step's batch whose loss rose most over their median of the previous (up to 20) steps:
  // (source, rise), largest first, at most 3.
  std::vector<std::pair<std::string, double>> top_sources;
};
std::vector<SpikeRow> spike_rows(const RunData& run);

}  // namespace keel::report

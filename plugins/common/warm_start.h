// Why: the built-in spike handlers decide from a rolling window of recent steps, so one that starts on a resumed
// or branched run without saved state would be blind for its first `min_history` steps, exactly where a resume
// "just before the spike" needs it. Keel's warm-start hook (keel/plugin.h) hands it the run's recorded history;
// this helper replays those rows through the shared detector (plugins/common/spike_window.h) in step order, as
// if the handler had been loaded all along: a row the detector calls a spike (or a non-finite one) stays out of
// the windows, as it would have live. Header-only, like spike_window.h (this folder is not a plugin).
#pragma once

#include <algorithm>
#include <cstdint>

#include "keel/plugin.h"
#include "spike_window.h"

namespace keel::plugins {

// Replays every row of `history` (oldest first) through `detector`; inactive_steps is what the windows still
// lack of min_history (0 once they hold enough).
inline sdk::WarmStartResult warm_start_detector(SpikeDetector& detector, const sdk::WarmStartHistory& history) {
  sdk::WarmStartResult result;
  for (const sdk::HistoryRow& row : history.rows) {
    sdk::StepContext ctx;  // metric/event channels are no-ops: a replay writes nothing
    ctx.step = row.step;
    ctx.loss = row.loss;
    ctx.grad_norm = row.grad_norm;
    detector.observe(ctx);
    ++result.rows_used;
  }
  const int64_t held = static_cast<int64_t>(detector.history());
  result.inactive_steps = std::max<int64_t>(0, detector.options().min_history - held);
  return result;
}

}  // namespace keel::plugins

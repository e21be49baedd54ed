// Why: every command of the `keel` binary and every rank of a run logs through one spdlog logger, set up the same
// way: the console (stderr) always, the run log (RUN_DIR/train.log, core/metrics/run_log.h) during a run, and in a
// multi-rank job a rank tag in every line. One function, so that the CLI and the run launcher
// (core/train/run_ranks.h) cannot set it up two different ways.
#pragma once

#include <string>

namespace keel::metrics {

// Log to the console (and to `log_file` when given) with spdlog's default logger. `log_file` becomes the run
// log of core/metrics/run_log.h: a failed write to it is remembered for throw_if_run_log_failed(); one that
// cannot be opened throws RunLogError naming it. `rank_tag` ("rank 3") goes into every line of a multi-rank
// job's log.
void setup_logging(const std::string& log_file = "", const std::string& rank_tag = "");

}  // namespace keel::metrics

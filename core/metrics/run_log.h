// Why: RUN_DIR/train.log is the run's own record, and a full disk under it must stop the run rather than be
// ignored (spdlog's file sink throws, its logger prints "[*** LOG ERROR ***]" on stderr and carries on). This
// is the file side of the `keel` logger: a sink that writes each line straight to the file (no buffer, so a
// kill loses nothing and a failed write is seen at the line that met it) and remembers the first failure,
// which the trainer turns into a one-line error once per step with throw_if_run_log_failed(). Torch-free.
#pragma once

#include <spdlog/common.h>
#include <spdlog/sinks/sink.h>

#include <memory>
#include <stdexcept>
#include <string>

namespace keel::metrics {

// The run log could not be opened or written: one line naming the file and the OS error, e.g.
// "run log: cannot write /x/run/train.log: No space left on device".
class RunLogError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Opens `path` for appending (created if missing) and returns the spdlog sink that writes it; this becomes the
// process's run log, replacing an earlier one (and forgetting its failure). Throws RunLogError naming the file
// if it cannot be opened. A later write that fails does not throw (the console keeps logging) but is
// remembered for throw_if_run_log_failed(). An empty `path` only forgets the earlier run log; returns null.
std::shared_ptr<spdlog::sinks::sink> open_run_log(const std::string& path);

// Throws RunLogError if a write to the run log has failed since open_run_log(); no-op without a run log.
void throw_if_run_log_failed();

// For spdlog::logger::set_error_handler: an error of another sink (or a bad format string) becomes one line
// on stderr, "keel: logging error: ...", at most once per process, instead of spdlog's "[*** LOG ERROR ***]"
// line on every call. Failures of the run log never reach it (its sink records them itself).
void log_error_handler(const std::string& message);

}  // namespace keel::metrics

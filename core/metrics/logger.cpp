// Why: see logger.h.
#include "core/metrics/logger.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <vector>

#include "core/metrics/run_log.h"

namespace keel::metrics {

void setup_logging(const std::string& log_file, const std::string& rank_tag) {
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  // The run log (train.log) writes each line through at once and remembers a failed write, which the trainer
  // reports with throw_if_run_log_failed(); without a log file, an earlier run log is forgotten.
  if (auto run_log = open_run_log(log_file)) sinks.push_back(run_log);
  auto logger = std::make_shared<spdlog::logger>("keel", sinks.begin(), sinks.end());
  logger->set_pattern(rank_tag.empty() ? "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v"
                                       : "[%Y-%m-%d %H:%M:%S.%e] [" + rank_tag + "] [%^%l%$] %v");
  logger->flush_on(spdlog::level::info);
  logger->set_error_handler(log_error_handler);
  spdlog::set_default_logger(logger);
}

}  // namespace keel::metrics

// Why: see progress.h — the text of the console progress line and the smoother behind its tok/s and ETA.
#include "core/metrics/progress.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace keel::metrics {

namespace {

std::string printf_string(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), format, value);
  return buffer;
}

// Like "%.4f" but "nan"/"inf"/"-inf" spelled the same on every libc.
std::string fixed_or_special(double value, const char* format) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return printf_string(format, value);
}

}  // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--";
  const auto total = static_cast<int64_t>(seconds);
  const int64_t days = total / 86400;
  const int64_t hours = (total % 86400) / 3600;
  const int64_t minutes = (total % 3600) / 60;
  const int64_t secs = total % 60;
  char buffer[48];
  if (days > 0) {
    std::snprintf(buffer, sizeof(buffer), "%lldd%02lldh", static_cast<long long>(days), static_cast<long long>(hours));
  } else if (hours > 0) {
    std::snprintf(buffer, sizeof(buffer), "%lldh%02lldm", static_cast<long long>(hours),
                  static_cast<long long>(minutes));
  } else if (minutes > 0) {
    std::snprintf(buffer, sizeof(buffer), "%lldm%02llds", static_cast<long long>(minutes),
                  static_cast<long long>(secs));
  } else {
    std::snprintf(buffer, sizeof(buffer), "%llds", static_cast<long long>(secs));
  }
  return buffer;
}

std::string format_si(double value) {
  if (!std::isfinite(value)) return "--";
  // Move up a unit whenever the printed number would reach 1000 (so 999.7 prints "1.0K", not "1000").
  if (std::round(std::fabs(value)) < 1000) return printf_string("%.0f", value);
  static constexpr const char* kSuffixes[] = {"K", "M", "G", "T"};
  double scaled = value / 1e3;
  for (const char* suffix : kSuffixes) {
    if (std::round(std::fabs(scaled) * 10) < 10000 || suffix == kSuffixes[3]) {
      return printf_string("%.1f", scaled) + suffix;
    }
    scaled /= 1e3;
  }
  return "--";  // unreachable
}

std::string format_progress(const ProgressInfo& info) {
  std::string line = "step " + std::to_string(info.step);
  if (info.total_steps > 0) line += " (" + std::to_string(info.step + 1) + "/" + std::to_string(info.total_steps) + ")";
  line += " | loss " + fixed_or_special(info.loss, "%.4f");
  line += " | gnorm " + fixed_or_special(info.grad_norm, "%.3f");
  line += " | lr " + fixed_or_special(info.lr, "%.1e");
  line += " | " + (info.tokens_per_s > 0 && std::isfinite(info.tokens_per_s) ? format_si(info.tokens_per_s) : "--") +
          " tok/s";
  line += " | ETA " + format_duration(info.eta_s);
  if (info.skipped) line += " | skipped";
  return line;
}

ThroughputMeter::ThroughputMeter(double alpha) : alpha_(alpha) {
  if (!(alpha > 0.0 && alpha <= 1.0)) {
    throw std::invalid_argument("ThroughputMeter: alpha must be in (0, 1], got " + std::to_string(alpha));
  }
}

void ThroughputMeter::update(double step_time_s, double tokens) {
  if (!std::isfinite(step_time_s) || step_time_s < 0 || !std::isfinite(tokens) || tokens < 0) return;
  if (count_ == 0) {
    step_time_s_ = step_time_s;
    tokens_ = tokens;
  } else {
    step_time_s_ += alpha_ * (step_time_s - step_time_s_);
    tokens_ += alpha_ * (tokens - tokens_);
  }
  ++count_;
}

void ThroughputMeter::reset() {
  count_ = 0;
  step_time_s_ = 0.0;
  tokens_ = 0.0;
}

double ThroughputMeter::tokens_per_s() const {
  if (count_ == 0 || step_time_s_ <= 0) return 0.0;
  return tokens_ / step_time_s_;
}

double ThroughputMeter::eta_s(int64_t remaining_steps) const {
  if (count_ == 0) return -1.0;
  return static_cast<double>(std::max<int64_t>(remaining_steps, 0)) * step_time_s_;
}

}  // namespace keel::metrics

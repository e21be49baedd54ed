// Why: the progress line is read by people and grepped by scripts, so its exact text is a contract: pin the
// format of every field, the unit and duration rules, the special values (nan loss, unknown ETA), and that
// the throughput smoother is a ratio of averages that converges to the true rate.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/metrics/progress.h"

using keel::metrics::format_duration;
using keel::metrics::format_progress;
using keel::metrics::format_si;
using keel::metrics::ProgressInfo;
using keel::metrics::ThroughputMeter;

TEST(ProgressFormat, ExampleLine) {
  ProgressInfo info;
  info.step = 119;  // 0-based: the 120th step
  info.total_steps = 1000;
  info.loss = 5.43211;
  info.grad_norm = 0.8123;
  info.lr = 2.1e-4;
  info.tokens_per_s = 12345.0;
  info.eta_s = 72.4;
  EXPECT_EQ(format_progress(info),
            "step 119 (120/1000) | loss 5.4321 | gnorm 0.812 | lr 2.1e-04 | 12.3K tok/s | ETA 1m12s");
}

TEST(ProgressFormat, LastStepOfARunSaysItsIndexAndAllStepsDone) {
  ProgressInfo info;
  info.step = 9;
  info.total_steps = 10;
  EXPECT_EQ(format_progress(info).rfind("step 9 (10/10) | ", 0), 0u) << format_progress(info);
}

TEST(ProgressFormat, UnknownValuesAndSkippedStep) {
  ProgressInfo info;
  info.step = 7;
  info.total_steps = 0;
  info.loss = std::numeric_limits<double>::quiet_NaN();
  info.grad_norm = std::numeric_limits<double>::infinity();
  info.lr = 0.0;
  info.tokens_per_s = 0.0;
  info.eta_s = -1.0;
  info.skipped = true;
  EXPECT_EQ(format_progress(info), "step 7 | loss nan | gnorm inf | lr 0.0e+00 | -- tok/s | ETA -- | skipped");
}

TEST(ProgressFormat, Durations) {
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(45.9), "45s");
  EXPECT_EQ(format_duration(60), "1m00s");
  EXPECT_EQ(format_duration(72), "1m12s");
  EXPECT_EQ(format_duration(3599), "59m59s");
  EXPECT_EQ(format_duration(3600 * 2 + 5 * 60 + 30), "2h05m");
  EXPECT_EQ(format_duration(86400 * 3 + 3600 * 4 + 17), "3d04h");
  EXPECT_EQ(format_duration(-1), "--");
  EXPECT_EQ(format_duration(std::numeric_limits<double>::quiet_NaN()), "--");
  EXPECT_EQ(format_duration(std::numeric_limits<double>::infinity()), "--");
}

TEST(ProgressFormat, SiUnits) {
  EXPECT_EQ(format_si(0), "0");
  EXPECT_EQ(format_si(850), "850");
  EXPECT_EQ(format_si(999.4), "999");
  EXPECT_EQ(format_si(999.6), "1.0K");
  EXPECT_EQ(format_si(12345), "12.3K");
  EXPECT_EQ(format_si(999960), "1.0M");
  EXPECT_EQ(format_si(4.5e6), "4.5M");
  EXPECT_EQ(format_si(1.23e9), "1.2G");
  EXPECT_EQ(format_si(2.5e12), "2.5T");
  EXPECT_EQ(format_si(3e15), "3000.0T");
  EXPECT_EQ(format_si(std::numeric_limits<double>::quiet_NaN()), "--");
}

TEST(ProgressMeter, FirstUpdateInitializesThenSmooths) {
  ThroughputMeter meter(0.5);
  EXPECT_FALSE(meter.has_data());
  EXPECT_EQ(meter.tokens_per_s(), 0.0);
  EXPECT_EQ(meter.eta_s(10), -1.0);
  meter.update(2.0, 1000);
  EXPECT_DOUBLE_EQ(meter.step_time_s(), 2.0);
  EXPECT_DOUBLE_EQ(meter.tokens_per_s(), 500.0);
  EXPECT_DOUBLE_EQ(meter.eta_s(10), 20.0);
  meter.update(1.0, 1000);  // EMA: time 1.5, tokens 1000
  EXPECT_DOUBLE_EQ(meter.step_time_s(), 1.5);
  EXPECT_DOUBLE_EQ(meter.tokens_per_s(), 1000.0 / 1.5);
  EXPECT_DOUBLE_EQ(meter.eta_s(0), 0.0);
  EXPECT_DOUBLE_EQ(meter.eta_s(-5), 0.0);
}

TEST(ProgressMeter, ConvergesAndIgnoresBadSamples) {
  ThroughputMeter meter(0.1);
  meter.update(30.0, 4096);  // slow first step (compilation, warm-up)
  for (int i = 0; i < 200; ++i) meter.update(0.5, 4096);
  EXPECT_NEAR(meter.tokens_per_s(), 8192.0, 1.0);
  const int64_t before = meter.count();
  meter.update(std::numeric_limits<double>::quiet_NaN(), 4096);
  meter.update(-1.0, 4096);
  EXPECT_EQ(meter.count(), before);
  meter.reset();
  EXPECT_FALSE(meter.has_data());
  EXPECT_THROW(ThroughputMeter(0.0), std::invalid_argument);
  EXPECT_THROW(ThroughputMeter(1.5), std::invalid_argument);
}

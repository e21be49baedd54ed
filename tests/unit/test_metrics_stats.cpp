// Why: /stats/ of metrics.h5 (metrics.stats_every) is a second row table beside /train: its rows must land with
// their step, a series missing from a row must read NaN (not 0), a resumed writer must continue it, and a series
// whose length changes or whose name is bad must be refused naming it, before anything reaches the file. The key
// itself must leave an existing run's config.ini (and config hash) unchanged while it is off.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/metrics/metrics_reader.h"
#include "core/metrics/metrics_writer.h"

namespace fs = std::filesystem;
using keel::metrics::MetricsReader;
using keel::metrics::MetricsWriter;
using keel::metrics::OpenMode;
using keel::metrics::StepRow;

namespace {

class MetricsStatsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "keel-stats-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = (dir_ / "metrics.h5").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path dir_;
  std::string path_;
};

StepRow row(int64_t step) {
  StepRow r;
  r.step = step;
  r.loss = 1.0;
  return r;
}

TEST_F(MetricsStatsTest, RowsLandWithTheirStepsAndAMissingSeriesReadsNaN) {
  {
    MetricsWriter w(path_, OpenMode::kCreate, {}, {}, /*flush_every=*/2);
    w.stats(0, {{"block_rms", {1.0f, 2.0f}}, {"z_max", {3.0f}}});
    w.append(row(0));
    w.append(row(1));                           // flushes /train and /stats together
    w.stats(2, {{"block_rms", {4.0f, 5.0f}}});  // z_max missing in this row
    w.append(row(2));
  }  // the destructor flushes the rest
  MetricsReader r(path_);
  EXPECT_EQ(r.read_int64("/stats/step"), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(r.info("/stats/block_rms").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(r.info("/stats/z_max").shape, (std::vector<int64_t>{2}));  // one value per row: 1-D
  const auto rms = r.read_matrix("/stats/block_rms");
  EXPECT_EQ(rms.values, (std::vector<float>{1.0f, 2.0f, 4.0f, 5.0f}));
  const auto z = r.read_double("/stats/z_max");
  EXPECT_EQ(z[0], 3.0);
  EXPECT_TRUE(std::isnan(z[1]));
}

TEST_F(MetricsStatsTest, AResumedWriterContinuesTheTable) {
  {
    MetricsWriter w(path_, OpenMode::kCreate, {}, {}, 1);
    w.stats(0, {{"logit_max", {7.0f}}});
    w.append(row(0));
  }
  {
    MetricsWriter w(path_, OpenMode::kAppend, {}, {}, 1);
    w.stats(1, {{"logit_max", {8.0f}}});
    w.append(row(1));
  }
  MetricsReader r(path_);
  EXPECT_EQ(r.read_int64("/stats/step"), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(r.read_double("/stats/logit_max"), (std::vector<double>{7.0, 8.0}));
}

TEST_F(MetricsStatsTest, BadNamesAndChangedLengthsAreRefusedNamingTheSeries) {
  MetricsWriter w(path_, OpenMode::kCreate, {}, {}, 10);
  w.stats(0, {{"block_rms", {1.0f, 2.0f}}});
  try {
    w.stats(1, {{"block_rms", {1.0f, 2.0f, 3.0f}}});
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("/stats/block_rms has 3 values at step 1 but 2"), std::string::npos)
        << e.what();
  }
  for (const std::string bad : {"", "a/b", "step"}) EXPECT_THROW(w.stats(2, {{bad, {1.0f}}}), std::invalid_argument);
  EXPECT_THROW(w.stats(2, {{"empty", {}}}), std::invalid_argument);
}

TEST(StatsEveryKey, OffByDefaultWrittenOnlyWhenOnAndNeverNegative) {
  const keel::Config off = keel::parse_config_text("[train]\nsteps = 3\n", "inline.ini");
  EXPECT_EQ(off.metrics.stats_every, 0);
  EXPECT_EQ(keel::to_ini(off).find("stats_every"), std::string::npos);
  const keel::Config on = keel::parse_config_text("[metrics]\nstats_every = 10\n", "inline.ini");
  EXPECT_EQ(on.metrics.stats_every, 10);
  EXPECT_NE(keel::to_ini(on).find("stats_every = 10"), std::string::npos);
  EXPECT_EQ(keel::parse_config_text(keel::to_ini(on), "again.ini").metrics.stats_every, 10);  // round trip
  try {
    keel::parse_config_text("", "inline.ini", {"metrics.stats_every=-2"});
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.stats_every must be >= 0 (0 = off), got -2"), std::string::npos)
        << e.what();
  }
}

}  // namespace

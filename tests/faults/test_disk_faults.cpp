// Why: a full disk must stop a command with one line naming the file and the OS error, a non-zero exit, and
// nothing lost: metrics.h5 keeps every row it had (readable, no fill values), eval and report leave no partial
// file under the final name, and HDF5 prints nothing of its own. Each case runs on a small tmpfs (SmallDisk:
// root only, skipped otherwise), through the `keel` binary where a user meets it, or through the writer API
// where the binary cannot yet show it (train.log: the trainer's per-step check is a separate change).
#include <gtest/gtest.h>
#include <spdlog/logger.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/metrics/metrics_reader.h"
#include "core/metrics/metrics_writer.h"
#include "core/metrics/run_log.h"
#include "faults/fault_support.h"

namespace fs = std::filesystem;
using keel::metrics::MetricsReader;
using keel::metrics::MetricsWriteError;
using keel::metrics::MetricsWriter;
using keel::metrics::OpenMode;
using keel::metrics::RunLogError;
using keel::metrics::StepRow;
using keel::testing::fresh_dir;
using keel::testing::last_line;
using keel::testing::run_keel;
using keel::testing::SmallDisk;
using keel::testing::test_data_override;
using keel::testing::tiny_config;

namespace {

#define SKIP_UNLESS_MOUNTED(disk) \
  if (!(disk).mounted()) GTEST_SKIP() << (disk).why_not()

// Fills the rest of the disk under `dir` with one file, so the next write there fails with ENOSPC.
void fill_disk(const std::string& dir) {
  std::FILE* f = std::fopen((dir + "/filler").c_str(), "wb");
  ASSERT_NE(f, nullptr);
  const std::vector<char> block(4096, 'x');
  while (std::fwrite(block.data(), 1, block.size(), f) == block.size() && std::fflush(f) == 0) {
  }
  std::fclose(f);
}

// The names in `dir` (not recursive).
std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  return names;
}

// Every /train column has the same rows, /train/step counts up by one from its first row, and no row is a
// fill value (a NaN loss or a step 0 past the first row).
void expect_no_fill_rows(const std::string& metrics_h5) {
  const MetricsReader reader(metrics_h5);
  const auto step = reader.read_int64("/train/step");
  const auto loss = reader.read_double("/train/loss");
  ASSERT_EQ(loss.size(), step.size());
  ASSERT_GT(step.size(), 0U);
  for (size_t i = 0; i < step.size(); ++i) {
    ASSERT_EQ(step[i], step[0] + static_cast<int64_t>(i)) << "row " << i;
    ASSERT_TRUE(std::isfinite(loss[i])) << "row " << i;
  }
}

StepRow row_of(int64_t i, size_t tensors) {
  StepRow row;
  row.step = i;
  row.loss = 5.0;
  row.tensor_grad_norms.assign(tensors, 1.0f);
  row.tensor_param_norms.assign(tensors, 2.0f);
  return row;
}

// A finished tiny run (final checkpoint) that the eval and report cases read; trained once for the suite.
class DiskFaultsWithRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    run_dir_ = fresh_dir("disk-faults-run");
    const auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir_ +
                            " --set train.steps=4");
    trained_ = r.exit_code == 0;
    if (!trained_) std::fprintf(stderr, "%s\n", r.output.c_str());
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(run_dir_, ec);
  }
  static std::string run_dir_;
  static bool trained_;
};
std::string DiskFaultsWithRun::run_dir_;
bool DiskFaultsWithRun::trained_ = false;

}  // namespace

// The observed case: training on a disk too small for its metrics used to exit 0 ("done: 3000 steps") with
// rows 1024.. as fill values and "HDF5: infinite loop closing library" at exit.
TEST(DiskFaults, FullDiskUnderMetricsStopsTrainingNamingTheFile) {
  SmallDisk disk("disk-metrics", 400 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string run = disk.dir() + "/run";
  // A much smaller model than tiny.ini's, so that the 1024 steps before metrics.h5 needs its second chunks
  // take seconds; no periodic checkpoint, so that metrics.h5 is what fills the disk.
  const auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run +
                          " --set train.steps=3000 --set train.micro_batch=1 --set train.grad_accum=1"
                          " --set model.seq_len=8 --set model.layers=1 --set model.d_model=16 --set model.heads=2"
                          " --set model.kv_heads=1 --set model.ffn_hidden=32 --set train.log_every=100000"
                          " --set checkpoint.every=0 --set checkpoint.at_end=false");
  EXPECT_NE(r.exit_code, 0) << r.output;
  const std::string line = last_line(r.output);
  EXPECT_NE(line.find(run + "/metrics.h5"), std::string::npos) << line;
  EXPECT_NE(line.find("No space left on device"), std::string::npos) << line;
  EXPECT_NE(line.find("not written"), std::string::npos) << line;
  EXPECT_EQ(r.output.find("infinite loop"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("HDF5-DIAG"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("done: 3000 steps"), std::string::npos) << r.output;
  expect_no_fill_rows(run + "/metrics.h5");
  EXPECT_LT(MetricsReader(run + "/metrics.h5").read_int64("/train/step").size(), 3000U);
}

// train.log on a full disk (metrics.h5 flushed rarely, so that the log is what fills the disk): the run stops
// naming train.log instead of dropping its log lines.
TEST(DiskFaults, FullDiskUnderTrainLogStopsTrainingNamingTheFile) {
  SmallDisk disk("disk-trainlog", 192 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string run = disk.dir() + "/run";
  const auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run +
                          " --set train.steps=100000 --set train.micro_batch=1 --set train.grad_accum=1"
                          " --set model.seq_len=8 --set model.layers=1 --set model.d_model=16 --set model.heads=2"
                          " --set model.kv_heads=1 --set model.ffn_hidden=32 --set train.log_every=1"
                          " --set metrics.flush_every=100000 --set checkpoint.every=0 --set checkpoint.at_end=false");
  EXPECT_NE(r.exit_code, 0) << last_line(r.output);
  const std::string line = last_line(r.output);
  EXPECT_NE(line.find(run + "/train.log"), std::string::npos) << line;
  EXPECT_NE(line.find("No space left on device"), std::string::npos) << line;
  EXPECT_EQ(r.output.find("LOG ERROR"), std::string::npos);
}

// The writer itself: the first failed flush throws MetricsWriteError naming the file, the OS error and the
// rows; the file keeps exactly the rows of earlier flushes; the destructor says nothing more; once there is
// room again, a retry writes the rows that failed.
TEST(DiskFaults, MetricsFlushOnFullDiskThrowsOnceAndKeepsEarlierRows) {
  SmallDisk disk("disk-writer", 1024 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string path = disk.dir() + "/metrics.h5";
  std::vector<std::string> tensor_names;
  for (int i = 0; i < 8; ++i) tensor_names.push_back("tensor" + std::to_string(i));
  ::testing::internal::CaptureStderr();
  {
    MetricsWriter writer(path, OpenMode::kCreate, {{"run.name", "disk"}}, tensor_names, 10);
    for (int64_t i = 0; i < 20; ++i) writer.append(row_of(i, tensor_names.size()));
    ASSERT_EQ(writer.buffered_rows(), 0);
    fill_disk(disk.dir());
    writer.event(19, "note", "buffered with the rows");
    for (int64_t i = 20; i < 29; ++i) writer.append(row_of(i, tensor_names.size()));
    try {
      writer.append(row_of(29, tensor_names.size()));
      FAIL() << "a flush on a full disk did not throw";
    } catch (const MetricsWriteError& e) {
      EXPECT_EQ(std::string(e.what()),
                "metrics: cannot write " + path + ": No space left on device (rows 20-29 not written)");
    }
    EXPECT_TRUE(writer.failed());
    EXPECT_EQ(writer.buffered_rows(), 10);
    EXPECT_EQ(MetricsReader(path).read_int64("/train/step").size(), 20U);
    expect_no_fill_rows(path);

    fs::remove(disk.dir() + "/filler");
    writer.flush();
    EXPECT_FALSE(writer.failed());
  }
  const std::string stderr_text = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(stderr_text, "") << "HDF5 or the destructor printed something";
  expect_no_fill_rows(path);
  const MetricsReader reader(path);
  EXPECT_EQ(reader.read_int64("/train/step").size(), 30U);
  EXPECT_EQ(reader.read_events().size(), 1U);
}

// A writer destroyed after a failed flush (the run stops there) does not try again, and leaves a file that
// h5dump reads without Keel.
TEST(DiskFaults, WriterDestroyedAfterAFailedFlushLeavesAReadableFile) {
  SmallDisk disk("disk-writer-exit", 512 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string path = disk.dir() + "/metrics.h5";
  {
    MetricsWriter writer(path, OpenMode::kCreate, {}, {}, 5);
    for (int64_t i = 0; i < 5; ++i) writer.append(row_of(i, 0));
    fill_disk(disk.dir());
    for (int64_t i = 5; i < 9; ++i) writer.append(row_of(i, 0));
    EXPECT_THROW(writer.append(row_of(9, 0)), MetricsWriteError);
    writer.event(9, "stop", "disk full");
  }
  expect_no_fill_rows(path);
  EXPECT_EQ(MetricsReader(path).read_int64("/train/step").size(), 5U);
  const auto dump = std::system(("h5dump -d /train/step " + path + " >/dev/null 2>&1").c_str());
  EXPECT_EQ(dump, 0) << "h5dump cannot read the file";
}

// The run log (train.log) on a full disk: the write fails, nothing is printed, and throw_if_run_log_failed()
// names the file and the OS error. (The trainer calls it once per step.)
TEST(DiskFaults, RunLogOnFullDiskIsReportedByName) {
  SmallDisk disk("disk-log", 64 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string path = disk.dir() + "/train.log";
  auto logger = std::make_shared<spdlog::logger>("disk-log-test", keel::metrics::open_run_log(path));
  logger->set_error_handler(keel::metrics::log_error_handler);
  logger->info("first line");
  EXPECT_NO_THROW(keel::metrics::throw_if_run_log_failed());
  EXPECT_NE(keel::testing::read_text_file(path).find("first line"), std::string::npos) << "not written at once";
  fill_disk(disk.dir());
  ::testing::internal::CaptureStderr();
  logger->info("a line that does not fit: {}", std::string(8192, 'y'));
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  try {
    keel::metrics::throw_if_run_log_failed();
    FAIL() << "a failed write to the run log was not reported";
  } catch (const RunLogError& e) {
    EXPECT_EQ(std::string(e.what()), "run log: cannot write " + path + ": No space left on device");
  }
  keel::metrics::open_run_log("");  // forget it: the next test's process state is clean
  EXPECT_NO_THROW(keel::metrics::throw_if_run_log_failed());
}

// `keel eval --out` on a full disk: one line naming the file, non-zero exit, no file (or temporary) left.
TEST_F(DiskFaultsWithRun, EvalOutputOnFullDiskLeavesNoFile) {
  ASSERT_TRUE(trained_);
  SmallDisk disk("disk-eval", 256 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  fill_disk(disk.dir());
  const std::string out = disk.dir() + "/eval.h5";
  const auto r = run_keel("eval " + run_dir_ + " --batches 1 --memorization-samples 1 --out " + out);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel eval: error: eval: cannot write " + out + ": No space left on device")
      << r.output;
  EXPECT_EQ(r.output.find("HDF5"), std::string::npos) << r.output;
  EXPECT_EQ(names_in(disk.dir()), std::vector<std::string>{"filler"});
}

// `keel report -o` on a disk too small for the page: one line naming the file, non-zero exit, nothing left.
TEST_F(DiskFaultsWithRun, ReportOnFullDiskLeavesNoFile) {
  ASSERT_TRUE(trained_);
  SmallDisk disk("disk-report", 128 * 1024);
  SKIP_UNLESS_MOUNTED(disk);
  const std::string out = disk.dir() + "/report.html";
  const auto r = run_keel("report " + run_dir_ + " -o " + out);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel report: error: report: cannot write " + out + ": No space left on device")
      << r.output;
  EXPECT_TRUE(names_in(disk.dir()).empty()) << names_in(disk.dir()).front();
}

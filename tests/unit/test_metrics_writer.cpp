// Why: metrics.h5 is a file format users read without Keel, so its layout (paths, dtypes, shapes,
// attributes), its values, resume-by-append and its crash behaviour are all user-visible contracts. These
// tests pin each one, including the bad-input paths, and kill a writing child process with SIGKILL to show
// that what was flushed survives.
#include <gtest/gtest.h>
#include <signal.h>
#include <spdlog/logger.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/io/hdf5.h"
#include "core/metrics/metrics_reader.h"
#include "core/metrics/metrics_writer.h"
#include "core/metrics/run_log.h"

namespace fs = std::filesystem;
using keel::metrics::DatasetInfo;
using keel::metrics::MetricsReader;
using keel::metrics::MetricsWriter;
using keel::metrics::OpenMode;
using keel::metrics::StepRow;

namespace {

const std::vector<std::string> kTensorNames = {"embed.weight", "layers.0.attn.wqkv.weight", "layers.0.mlp.w2.weight",
                                               "norm.weight"};

// Deterministic row i (0-based), so any reader can recompute what must be in the file.
StepRow make_row(int64_t i, size_t n_tensors = kTensorNames.size()) {
  StepRow row;
  row.step = 100 + i;
  row.loss = 10.0 - 0.01 * static_cast<double>(i);
  row.grad_norm = 0.5 + static_cast<double>(i);
  row.lr = 1e-4 * static_cast<double>(i);
  row.tokens = 4096 * (i + 1);
  row.tokens_per_s = 1000.0 + static_cast<double>(i);
  row.step_time_s = 0.25;
  row.skipped = (i % 7) == 3;
  for (size_t j = 0; j < n_tensors; ++j) {
    row.tensor_grad_norms.push_back(static_cast<float>(i) + 0.5f * static_cast<float>(j));
    row.tensor_param_norms.push_back(100.0f + static_cast<float>(i) - static_cast<float>(j));
  }
  return row;
}

std::vector<std::pair<std::string, std::string>> config_attrs() {
  return {{"model.layers", "2"}, {"optim.lr", "0.0003"}, {"run.name", "unit test"}};
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "keel-metrics-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = (dir_ / "metrics.h5").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Checks every /train column holds rows [0, n) of make_row (first `rows` rows; -1 = all, exact length n).
  static void expect_rows(const MetricsReader& reader, int64_t n, int64_t first_index = 0) {
    const auto step = reader.read_int64("/train/step");
    const auto loss = reader.read_double("/train/loss");
    const auto gnorm = reader.read_double("/train/grad_norm");
    const auto lr = reader.read_double("/train/lr");
    const auto tokens = reader.read_int64("/train/tokens");
    const auto tps = reader.read_double("/train/tokens_per_s");
    const auto st = reader.read_double("/train/step_time_s");
    const auto skipped = reader.read_int64("/train/skipped");
    ASSERT_EQ(static_cast<int64_t>(step.size()), n);
    for (const auto* col : {&loss, &gnorm, &lr, &tps, &st}) ASSERT_EQ(static_cast<int64_t>(col->size()), n);
    ASSERT_EQ(static_cast<int64_t>(tokens.size()), n);
    ASSERT_EQ(static_cast<int64_t>(skipped.size()), n);
    for (int64_t k = 0; k < n; ++k) {
      const StepRow row = make_row(first_index + k);
      const auto u = static_cast<size_t>(k);
      EXPECT_EQ(step[u], row.step);
      EXPECT_DOUBLE_EQ(loss[u], row.loss);
      EXPECT_DOUBLE_EQ(gnorm[u], row.grad_norm);
      EXPECT_DOUBLE_EQ(lr[u], row.lr);
      EXPECT_EQ(tokens[u], row.tokens);
      EXPECT_DOUBLE_EQ(tps[u], row.tokens_per_s);
      EXPECT_DOUBLE_EQ(st[u], row.step_time_s);
      EXPECT_EQ(skipped[u], row.skipped ? 1 : 0);
    }
  }

  fs::path dir_;
  std::string path_;
};

std::vector<int64_t> shape_of(const MetricsReader& reader, const std::string& dataset) {
  return reader.info(dataset).shape;
}

// A Python interpreter that can `import h5py`, or "" (then the h5py checks are skipped). The system Python
// is tried too because a pyenv/venv python3 on PATH often lacks Debian's python3-h5py.
std::string python_with_h5py() {
  for (const char* python : {"python3", "/usr/bin/python3"}) {
    if (std::system((std::string(python) + " -c 'import h5py' >/dev/null 2>&1").c_str()) == 0) return python;
  }
  return "";
}

}  // namespace

TEST_F(MetricsTest, CreatesLayoutWithDtypesAndShapes) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 1000);
    for (int64_t i = 0; i < 7; ++i) writer.append(make_row(i));
    EXPECT_EQ(writer.buffered_rows(), 7);
    writer.flush();
    EXPECT_EQ(writer.buffered_rows(), 0);
    EXPECT_EQ(writer.rows(), 7);
  }
  MetricsReader reader(path_);
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"/train/step", "int64"},          {"/train/loss", "float64"},  {"/train/grad_norm", "float64"},
      {"/train/lr", "float64"},          {"/train/tokens", "int64"},  {"/train/tokens_per_s", "float64"},
      {"/train/step_time_s", "float64"}, {"/train/skipped", "uint8"},
  };
  for (const auto& [path, dtype] : expected) {
    SCOPED_TRACE(path);
    ASSERT_TRUE(reader.has_dataset(path));
    const DatasetInfo info = reader.info(path);
    EXPECT_EQ(info.dtype, dtype);
    EXPECT_EQ(info.shape, (std::vector<int64_t>{7}));
  }
  EXPECT_EQ(reader.info("/events").dtype, "compound");
  EXPECT_EQ(shape_of(reader, "/events"), (std::vector<int64_t>{0}));
  expect_rows(reader, 7);

  // Root attributes.
  ASSERT_EQ(reader.read_string_attribute("/", "keel_version").size(), 1u);
  EXPECT_FALSE(reader.read_string_attribute("/", "keel_version")[0].empty());
  const std::string created = reader.read_string_attribute("/", "created_utc").at(0);
  EXPECT_EQ(created.size(), 20u) << created;  // 2024-05-01T12:34:56Z
  EXPECT_EQ(created.back(), 'Z');

  // Listing: all of the above plus the tensor matrices, sorted.
  const auto datasets = reader.list_datasets();
  std::vector<std::string> paths;
  for (const auto& d : datasets) paths.push_back(d.path);
  EXPECT_TRUE(std::is_sorted(paths.begin(), paths.end()));
  EXPECT_EQ(paths.size(), expected.size() + 3);  // + /events + two tensor matrices
}

TEST_F(MetricsTest, TensorMatricesAndNames) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, kTensorNames, 4);
    for (int64_t i = 0; i < 10; ++i) writer.append(make_row(i));
    StepRow no_norms = make_row(10);
    no_norms.tensor_grad_norms.clear();
    no_norms.tensor_param_norms.clear();
    writer.append(no_norms);
  }  // destructor flushes the last 3 rows
  MetricsReader reader(path_);
  const size_t n_tensors = kTensorNames.size();
  for (const char* matrix : {"/train/tensor/grad_norm", "/train/tensor/param_norm"}) {
    SCOPED_TRACE(matrix);
    const DatasetInfo info = reader.info(matrix);
    EXPECT_EQ(info.dtype, "float32");
    EXPECT_EQ(info.shape, (std::vector<int64_t>{11, static_cast<int64_t>(n_tensors)}));
    EXPECT_EQ(reader.read_string_attribute(matrix, "names"), kTensorNames);
  }
  const auto grad = reader.read_matrix("/train/tensor/grad_norm");
  const auto param = reader.read_matrix("/train/tensor/param_norm");
  ASSERT_EQ(grad.rows, 11);
  ASSERT_EQ(grad.cols, static_cast<int64_t>(n_tensors));
  for (int64_t i = 0; i < 10; ++i) {
    const StepRow row = make_row(i);
    for (size_t j = 0; j < n_tensors; ++j) {
      EXPECT_FLOAT_EQ(grad.at(i, static_cast<int64_t>(j)), row.tensor_grad_norms[j]);
      EXPECT_FLOAT_EQ(param.at(i, static_cast<int64_t>(j)), row.tensor_param_norms[j]);
    }
  }
  for (int64_t j = 0; j < static_cast<int64_t>(n_tensors); ++j) {
    EXPECT_TRUE(std::isnan(grad.at(10, j)));
    EXPECT_TRUE(std::isnan(param.at(10, j)));
  }
  EXPECT_EQ(reader.read_int64("/train/step").size(), 11u);
}

TEST_F(MetricsTest, NoTensorNamesMeansNoMatrices) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 2);
    writer.append(make_row(0, 0));
  }
  MetricsReader reader(path_);
  EXPECT_FALSE(reader.has_dataset("/train/tensor/grad_norm"));
  EXPECT_EQ(reader.read_int64("/train/step"), (std::vector<int64_t>{100}));
}

TEST_F(MetricsTest, WrongNumberOfTensorNormsIsRejected) {
  MetricsWriter writer(path_, OpenMode::kCreate, {}, kTensorNames, 10);
  StepRow row = make_row(0);
  row.tensor_grad_norms.pop_back();
  EXPECT_THROW(writer.append(row), std::invalid_argument);
  EXPECT_EQ(writer.rows(), 0);
}

TEST_F(MetricsTest, EventsRoundTrip) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 100);
    writer.event(5, "spike", "loss 9.1 > 3 sigma");
    writer.event(6, "skip", "");
    writer.flush();
    writer.event(20, "checkpoint", "step-00000020 (unicode: \xc3\xa9\xe2\x9c\x93)");
    writer.event(21, "note", std::string(5000, 'x'));
  }
  MetricsReader reader(path_);
  const auto events = reader.read_events();
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events[0].step, 5);
  EXPECT_EQ(events[0].kind, "spike");
  EXPECT_EQ(events[0].text, "loss 9.1 > 3 sigma");
  EXPECT_EQ(events[1].kind, "skip");
  EXPECT_EQ(events[1].text, "");
  EXPECT_EQ(events[2].step, 20);
  EXPECT_EQ(events[2].text, "step-00000020 (unicode: \xc3\xa9\xe2\x9c\x93)");
  EXPECT_EQ(events[3].text, std::string(keel::metrics::kEventTextMaxBytes - 3, 'x') + "...");
  EXPECT_EQ(reader.info("/events").shape, (std::vector<int64_t>{4}));
}

TEST_F(MetricsTest, LongEventStringsAreCutAtUtf8Boundaries) {
  // 30 ASCII bytes + a 3-byte character straddling the 31-byte kind limit.
  const std::string kind = std::string(27, 'k') + "\xe2\x9c\x93" + "tail";
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 100);
    writer.event(1, kind, "ok");
    writer.event(2, std::string(keel::metrics::kEventKindMaxBytes, 'a'), "");  // exactly the limit: kept
  }
  const auto events = MetricsReader(path_).read_events();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, std::string(27, 'k') + "...");
  EXPECT_EQ(events[1].kind, std::string(keel::metrics::kEventKindMaxBytes, 'a'));
}

TEST_F(MetricsTest, ConfigAttributes) {
  { MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), {}, 10); }
  MetricsReader reader(path_);
  EXPECT_EQ(reader.read_config(), config_attrs());  // sorted by key; config_attrs() already is
  EXPECT_EQ(reader.read_string_attribute("/config", "run.name"), (std::vector<std::string>{"unit test"}));
}

TEST_F(MetricsTest, ExtraScalarsHaveTheirOwnSteps) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 3);
    writer.scalar(3, "zloss", 0.5);
    writer.scalar(7, "zloss", 0.25);
    writer.scalar(7, "embed_shrink", 0.1);
    writer.flush();
    writer.scalar(9, "zloss", 0.125);
  }
  MetricsReader reader(path_);
  EXPECT_EQ(reader.read_double("/train/extra/zloss"), (std::vector<double>{0.5, 0.25, 0.125}));
  EXPECT_EQ(reader.read_int64("/train/extra/zloss_step"), (std::vector<int64_t>{3, 7, 9}));
  EXPECT_EQ(reader.read_double("/train/extra/embed_shrink"), (std::vector<double>{0.1}));
  EXPECT_EQ(reader.read_int64("/train/extra/embed_shrink_step"), (std::vector<int64_t>{7}));
  EXPECT_EQ(reader.info("/train/extra/zloss").dtype, "float64");
  EXPECT_EQ(reader.info("/train/extra/zloss_step").dtype, "int64");
  EXPECT_EQ(reader.read_int64("/train/step").size(), 0u);
}

TEST_F(MetricsTest, BadScalarNamesAreRejected) {
  MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 3);
  EXPECT_THROW(writer.scalar(1, "", 1.0), std::invalid_argument);
  EXPECT_THROW(writer.scalar(1, "a/b", 1.0), std::invalid_argument);
  EXPECT_THROW(writer.scalar(1, "foo_step", 1.0), std::invalid_argument);
  EXPECT_THROW(writer.scalar(1, "..", 1.0), std::invalid_argument);
}

TEST_F(MetricsTest, AppendModeContinuesRows) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 5);
    for (int64_t i = 0; i < 12; ++i) writer.append(make_row(i));
    writer.event(11, "checkpoint", "a");
    writer.scalar(11, "x", 1.0);
  }
  auto changed = config_attrs();
  changed[1].second = "0.0001";                  // optim.lr changed on resume
  changed.emplace_back("spike.plugin", "skip");  // new key
  {
    MetricsWriter writer(path_, OpenMode::kAppend, changed, kTensorNames, 5);
    EXPECT_EQ(writer.rows(), 12);
    for (int64_t i = 12; i < 20; ++i) writer.append(make_row(i));
    writer.event(19, "resume", "b");
    writer.scalar(19, "x", 2.0);
  }
  MetricsReader reader(path_);
  expect_rows(reader, 20);
  EXPECT_EQ(reader.read_matrix("/train/tensor/grad_norm").rows, 20);
  EXPECT_FLOAT_EQ(reader.read_matrix("/train/tensor/grad_norm").at(19, 1), make_row(19).tensor_grad_norms[1]);
  EXPECT_EQ(reader.read_double("/train/extra/x"), (std::vector<double>{1.0, 2.0}));
  const auto events = reader.read_events();
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].kind, "checkpoint");
  EXPECT_EQ(events[1].kind, "config_changed");
  EXPECT_EQ(events[1].step, -1);
  EXPECT_EQ(events[1].text, "optim.lr: '0.0003' -> '0.0001'");
  EXPECT_EQ(events[2].kind, "resume");
  const auto config = reader.read_config();
  EXPECT_EQ(config.size(), 4u);
  EXPECT_EQ(reader.read_string_attribute("/config", "optim.lr")[0], "0.0003");  // original kept
  EXPECT_EQ(reader.read_string_attribute("/config", "spike.plugin")[0], "skip");
}

TEST_F(MetricsTest, AppendModeRejectsDifferentTensorNames) {
  { MetricsWriter writer(path_, OpenMode::kCreate, {}, kTensorNames, 5); }
  auto other = kTensorNames;
  other[2] = "renamed.weight";
  try {
    MetricsWriter writer(path_, OpenMode::kAppend, {}, other, 5);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/train/tensor/grad_norm"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path_), std::string::npos) << e.what();
  }
  EXPECT_THROW(MetricsWriter(path_, OpenMode::kAppend, {}, {}, 5), std::runtime_error);
}

TEST_F(MetricsTest, CreateRefusesExistingFileAndAppendRefusesMissingOne) {
  { MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 5); }
  try {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 5);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
  const std::string missing = (dir_ / "nope.h5").string();
  try {
    MetricsWriter writer(missing, OpenMode::kAppend, {}, {}, 5);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_THROW(MetricsWriter((dir_ / "no-such-dir" / "m.h5").string(), OpenMode::kCreate, {}, {}, 5),
               std::runtime_error);
  EXPECT_THROW(MetricsWriter((dir_ / "x.h5").string(), OpenMode::kCreate, {}, {}, 0), std::invalid_argument);
}

TEST_F(MetricsTest, AppendRefusesNonHdf5File) {
  { std::ofstream(path_) << "not hdf5\n"; }
  EXPECT_THROW(MetricsWriter(path_, OpenMode::kAppend, {}, {}, 5), std::runtime_error);
  EXPECT_THROW(MetricsReader{path_}, std::runtime_error);
}

TEST_F(MetricsTest, ReaderErrorsNameFileAndDataset) {
  EXPECT_THROW(MetricsReader((dir_ / "missing.h5").string()), std::runtime_error);
  { MetricsWriter writer(path_, OpenMode::kCreate, {}, {}, 5); }
  MetricsReader reader(path_);
  try {
    reader.read_double("/train/nope");
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/train/nope"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path_), std::string::npos) << e.what();
  }
  EXPECT_THROW(reader.read_int64("/train/loss"), std::runtime_error);   // float dataset as int64
  EXPECT_THROW(reader.read_matrix("/train/loss"), std::runtime_error);  // 1-D as matrix
  EXPECT_THROW(reader.read_string_attribute("/", "nope"), std::runtime_error);
  EXPECT_FALSE(reader.has_dataset("/nope/deeper"));
}

TEST_F(MetricsTest, FileIsClosedBetweenFlushes) {
  MetricsWriter writer(path_, OpenMode::kCreate, {}, kTensorNames, 3);
  for (int64_t i = 0; i < 7; ++i) writer.append(make_row(i));  // auto-flushes at 3 and 6
  // The file is readable (and the writer holds no HDF5 id on it) while the writer lives.
  MetricsReader reader(path_);
  expect_rows(reader, 6);
  EXPECT_EQ(writer.buffered_rows(), 1);
  writer.flush();
  expect_rows(reader, 7);
}

TEST_F(MetricsTest, RepeatedFlushesKeepFileSmall) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, {}, kTensorNames, 1);
    for (int64_t i = 0; i < 300; ++i) writer.append(make_row(i));
  }
  MetricsReader reader(path_);
  expect_rows(reader, 300);
  // 300 single-row flushes must not leave reserved tails or rewritten chunks behind.
  EXPECT_LT(fs::file_size(path_), 256u * 1024u);
}

// A flush reserves disk space past the end of the file before HDF5 writes, and HDF5 cuts the file back when
// it closes it. A kill in between leaves zero bytes past HDF5's end of file: readers and a resumed writer
// must not mind them.
TEST_F(MetricsTest, ZeroTailOfAnInterruptedReservationIsHarmless) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 5);
    for (int64_t i = 0; i < 10; ++i) writer.append(make_row(i));
  }
  const auto size = fs::file_size(path_);
  fs::resize_file(path_, size + 300 * 1024);
  expect_rows(MetricsReader(path_), 10);
  {
    MetricsWriter writer(path_, OpenMode::kAppend, config_attrs(), kTensorNames, 5);
    for (int64_t i = 10; i < 20; ++i) writer.append(make_row(i));
  }
  expect_rows(MetricsReader(path_), 20);
  EXPECT_LT(fs::file_size(path_), size + 300 * 1024) << "the reservation tail was not cut back";
}

// HDF5's own error stacks never reach the user: a damaged file is one line naming it, and HDF5 prints nothing.
TEST_F(MetricsTest, Hdf5ErrorsAreOneLineAndHdf5PrintsNothing) {
  {
    MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 5);
    for (int64_t i = 0; i < 10; ++i) writer.append(make_row(i));
  }
  fs::resize_file(path_, fs::file_size(path_) / 2);  // a truncated copy
  ::testing::internal::CaptureStderr();
  for (const auto& attempt : std::vector<std::function<void()>>{
           [&] {
             MetricsReader reader(path_);
             reader.read_int64("/train/step");
           },
           [&] { MetricsWriter writer(path_, OpenMode::kAppend, config_attrs(), kTensorNames, 5); }}) {
    try {
      attempt();
      ADD_FAILURE() << "a truncated file was read";
    } catch (const std::runtime_error& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.find('\n'), std::string::npos) << message;
      EXPECT_NE(message.find(path_), std::string::npos) << message;
    }
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  EXPECT_EQ(keel::io::one_line("a\nb\tc\r"), "a b c ");
}

// The run log reports a failed write (here /dev/full: every write is ENOSPC) by name, and only through
// throw_if_run_log_failed(): spdlog's "[*** LOG ERROR ***]" never appears.
TEST(RunLog, FailedWriteIsReportedByNameAndNotPrinted) {
  const std::string log_path = (fs::temp_directory_path() / ("keel-run-log-" + std::to_string(::getpid()))).string();
  {
    auto logger = std::make_shared<spdlog::logger>("run-log-test", keel::metrics::open_run_log(log_path));
    logger->info("line {}", 1);
    EXPECT_NO_THROW(keel::metrics::throw_if_run_log_failed());
    std::ifstream in(log_path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find("line 1"), std::string::npos) << "not written through at once";
  }
  fs::remove(log_path);
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  auto logger = std::make_shared<spdlog::logger>("run-log-full", keel::metrics::open_run_log("/dev/full"));
  logger->set_error_handler(keel::metrics::log_error_handler);
  ::testing::internal::CaptureStderr();
  logger->info("does not fit");
  logger->flush();
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  try {
    keel::metrics::throw_if_run_log_failed();
    FAIL() << "a failed write was not reported";
  } catch (const keel::metrics::RunLogError& e) {
    EXPECT_EQ(std::string(e.what()), "run log: cannot write /dev/full: No space left on device");
  }
  keel::metrics::open_run_log("");
  EXPECT_NO_THROW(keel::metrics::throw_if_run_log_failed());
  EXPECT_THROW(keel::metrics::open_run_log((fs::temp_directory_path() / "no-such-dir" / "train.log").string()),
               keel::metrics::RunLogError);
}

// A child process writes rows with flush_every=5 and keeps writing; once it has flushed >= 10 rows it tells
// the parent through a pipe, and the parent SIGKILLs it. Everything flushed before the kill must be readable.
TEST_F(MetricsTest, SurvivesSigkillAfterFlush) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    int status = 0;
    try {
      MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 5);
      bool told = false;
      for (int64_t i = 0; i < 1000000; ++i) {
        writer.append(make_row(i));
        if (i % 10 == 0) writer.event(100 + i, "tick", "row " + std::to_string(i));
        if (!told && writer.rows() - writer.buffered_rows() >= 10) {
          const char byte = 'F';
          if (::write(fds[1], &byte, 1) != 1) break;
          told = true;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(500));
      }
    } catch (...) {
      status = 1;
    }
    ::_exit(status);  // never return into the test framework
  }
  ::close(fds[1]);
  char byte = 0;
  ASSERT_EQ(::read(fds[0], &byte, 1), 1) << "child exited before flushing 10 rows";
  ::close(fds[0]);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // the child keeps writing meanwhile
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "child was not killed but exited";

  // The kill may land inside a flush: then the other columns can be one flush longer than /train/step, the
  // commit column, which is never longer than any of them (docs/metrics.md, "Kill during a flush").
  MetricsReader reader(path_);
  const int64_t n = static_cast<int64_t>(reader.read_int64("/train/step").size());
  ASSERT_GE(n, 10);
  for (const char* column : {"/train/loss", "/train/grad_norm", "/train/lr", "/train/tokens_per_s",
                             "/train/step_time_s", "/train/tokens", "/train/skipped"}) {
    const int64_t rows = reader.info(column).shape.at(0);
    EXPECT_TRUE(rows == n || rows == n + 5) << column << " has " << rows << " rows, /train/step " << n;
  }
  const auto loss = reader.read_double("/train/loss");
  for (int64_t k = 0; k < n; ++k) ASSERT_DOUBLE_EQ(loss[static_cast<size_t>(k)], make_row(k).loss) << "row " << k;
  const auto grad = reader.read_matrix("/train/tensor/grad_norm");
  ASSERT_GE(grad.rows, n);
  EXPECT_FLOAT_EQ(grad.at(n - 1, 3), make_row(n - 1).tensor_grad_norms[3]);
  EXPECT_GE(reader.read_events().size(), 1u);
  EXPECT_EQ(reader.read_config(), config_attrs());

  // The killed run's file can be continued by a resumed run.
  {
    MetricsWriter writer(path_, OpenMode::kAppend, config_attrs(), kTensorNames, 5);
    EXPECT_EQ(writer.rows(), n);
    writer.append(make_row(n));
  }
  expect_rows(MetricsReader(path_), n + 1);
}

// Optional: the same file read by h5py (skipped where h5py is not installed).
TEST_F(MetricsTest, ReadableByH5py) {
  const std::string python = python_with_h5py();
  if (python.empty()) GTEST_SKIP() << "python3 h5py not installed";
  {
    MetricsWriter writer(path_, OpenMode::kCreate, config_attrs(), kTensorNames, 4);
    for (int64_t i = 0; i < 9; ++i) writer.append(make_row(i));
    writer.event(3, "spike", "text");
    writer.scalar(4, "zloss", 0.5);
  }
  const std::string script = (dir_ / "check.py").string();
  std::ofstream(script) << "import sys, h5py, numpy as np\n"
                           "f = h5py.File(sys.argv[1], 'r')\n"
                           "assert f['/train/step'].dtype == np.int64 and f['/train/step'].shape == (9,)\n"
                           "assert list(f['/train/step'][:]) == list(range(100, 109))\n"
                           "assert abs(f['/train/loss'][8] - (10 - 0.08)) < 1e-12\n"
                           "assert f['/train/skipped'].dtype == np.uint8\n"
                           "g = f['/train/tensor/grad_norm']\n"
                           "assert g.dtype == np.float32 and g.shape == (9, 4)\n"
                           "names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs['names']]\n"
                           "assert names[0] == 'embed.weight', names\n"
                           "e = f['/events'][:]\n"
                           "k = e['kind'][0]\n"
                           "assert e['step'][0] == 3 and (k.decode() if isinstance(k, bytes) else k) == 'spike'\n"
                           "v = f['/config'].attrs['run.name']\n"
                           "assert (v.decode() if isinstance(v, bytes) else v) == 'unit test'\n"
                           "assert list(f['/train/extra/zloss_step'][:]) == [4]\n";
  EXPECT_EQ(std::system((python + " " + script + " " + path_).c_str()), 0);
}

// Manual stress test of the crash semantics (run with --gtest_also_run_disabled_tests): kill a child that
// flushes after every row, with no pause, many times, and require every file to open and be consistent.
TEST_F(MetricsTest, DISABLED_SigkillStress) {
  int unreadable = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const std::string path = (dir_ / ("m" + std::to_string(trial) + ".h5")).string();
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[0]);
      try {
        MetricsWriter writer(path, OpenMode::kCreate, {}, kTensorNames, 1);
        for (int64_t i = 0; i < 10000000; ++i) {
          writer.append(make_row(i));
          writer.event(i, "tick", "row");
          if (i == 10) {
            const char byte = 'F';
            if (::write(fds[1], &byte, 1) != 1) break;
          }
        }
      } catch (...) {
      }
      ::_exit(0);
    }
    ::close(fds[1]);
    char byte = 0;
    ASSERT_EQ(::read(fds[0], &byte, 1), 1);
    ::close(fds[0]);
    std::this_thread::sleep_for(std::chrono::microseconds(1000 + 997 * (trial % 50)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    try {
      MetricsReader reader(path);
      const auto step = reader.read_int64("/train/step");
      const auto loss = reader.read_double("/train/loss");
      const auto grad = reader.read_matrix("/train/tensor/grad_norm");
      reader.read_events();
      const size_t n = std::min({step.size(), loss.size(), static_cast<size_t>(grad.rows)});
      ASSERT_GE(n, 10u);
      for (size_t k = 0; k < n; ++k) {
        ASSERT_EQ(step[k], make_row(static_cast<int64_t>(k)).step);
        ASSERT_DOUBLE_EQ(loss[k], make_row(static_cast<int64_t>(k)).loss);
      }
      MetricsWriter reopened(path, OpenMode::kAppend, {}, kTensorNames, 1);
    } catch (const std::exception& e) {
      ++unreadable;
      ADD_FAILURE() << "trial " << trial << ": " << e.what();
    }
  }
  EXPECT_EQ(unreadable, 0);
}

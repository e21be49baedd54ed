// Why: `keel verify` and `resume.verify_steps` rest on two small pieces that must be exactly right: metrics.h5's
// per-sample and per-source losses (/data/sample_loss aligned with /data/batch, /train/source_loss one row per
// step, NaN where a source had no sample) and the bit-for-bit comparison of a replayed step with a logged one,
// which must name the first value that differs and read a re-run step's later row.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "core/forensics/replay_check.h"
#include "core/metrics/metrics_reader.h"
#include "core/metrics/metrics_writer.h"
#include "test_support.h"

using keel::forensics::compare_step;
using keel::forensics::LoggedStep;
using keel::forensics::ReplayCheck;
using keel::metrics::BatchSample;
using keel::metrics::MetricsReader;
using keel::metrics::MetricsWriter;
using keel::metrics::OpenMode;
using keel::metrics::StepRow;
using keel::testing::test_dir;

namespace {

// A step of two samples (slot 0 from source 0, slot 1 from source `second`), per-tensor norms for tensors a, b.
StepRow row(int64_t step, double loss, float first_sample, int64_t second = 1) {
  StepRow r;
  r.step = step;
  r.loss = loss;
  r.grad_norm = 0.5 + static_cast<double>(step);
  r.tensor_grad_norms = {0.25f, 0.75f};
  r.tensor_param_norms = {1.0f, 2.0f};
  BatchSample a, b;
  a.slot = 0;
  a.source = 0;
  a.loss = first_sample;
  b.slot = 1;
  b.source = second;
  b.loss = 3.0f;
  r.batch = {a, b};
  r.source_loss = second == 1 ? std::vector<double>{first_sample, 3.0}
                              : std::vector<double>{(first_sample + 3.0) / 2, std::numeric_limits<double>::quiet_NaN()};
  return r;
}

std::string write_run(const std::vector<StepRow>& rows) {
  const std::string path = test_dir() + "/metrics.h5";
  MetricsWriter writer(path, OpenMode::kCreate, {}, {"a", "b"}, 100);
  writer.set_batch_sources({"prose", "code"});
  for (const auto& r : rows) writer.append(r);
  return path;
}

}  // namespace

TEST(SampleLoss, PerSampleAndPerSourceLossesAreWrittenAlignedWithTheBatchRecord) {
  const std::string path = write_run({row(0, 2.0, 1.0f), row(1, 2.5, 2.0f, 0)});
  const MetricsReader reader(path);
  EXPECT_EQ(reader.read_double("/data/sample_loss"), (std::vector<double>{1.0, 3.0, 2.0, 3.0}));
  EXPECT_EQ(reader.read_batch().size(), 4u);
  EXPECT_EQ(reader.read_string_attribute("/train/source_loss", "names"), (std::vector<std::string>{"prose", "code"}));
  const auto m = reader.read_matrix("/train/source_loss");
  ASSERT_EQ(m.rows, 2);
  ASSERT_EQ(m.cols, 2);
  EXPECT_FLOAT_EQ(m.at(0, 0), 1.0f);
  EXPECT_FLOAT_EQ(m.at(0, 1), 3.0f);
  EXPECT_FLOAT_EQ(m.at(1, 0), 2.5f);
  EXPECT_TRUE(std::isnan(m.at(1, 1))) << "a source with no sample in the step is NaN";
}

TEST(SampleLoss, ARowWithTheWrongNumberOfSourceLossesIsRefused) {
  MetricsWriter writer(test_dir() + "/metrics.h5", OpenMode::kCreate, {}, {}, 100);
  writer.set_batch_sources({"prose", "code"});
  StepRow r;
  r.source_loss = {1.0, 2.0, 3.0};
  try {
    writer.append(r);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("3 per-source losses but"), std::string::npos) << e.what();
  }
}

TEST(ReplayCheck, ReadsEveryLoggedValueAndARerunStepsLaterRow) {
  // Step 1 ran twice (a rollback): its later row, and its later block of samples, are the ones that count.
  const std::string path = write_run({row(0, 2.0, 1.0f), row(1, 9.0, 9.0f), row(1, 2.5, 2.0f)});
  const auto run = keel::forensics::read_logged_run(path);
  ASSERT_EQ(run.steps.size(), 2u);
  EXPECT_EQ(run.tensor_names, (std::vector<std::string>{"a", "b"}));
  const LoggedStep& s1 = run.steps.at(1);
  EXPECT_EQ(s1.loss, 2.5);
  EXPECT_EQ(s1.grad_norm, 1.5);
  EXPECT_EQ(s1.tensor_grad_norms, (std::vector<float>{0.25f, 0.75f}));
  EXPECT_EQ(s1.tensor_param_norms, (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(s1.sample_losses, (std::vector<float>{2.0f, 3.0f}));
}

TEST(ReplayCheck, NamesTheFirstValueThatDiffersBitForBit) {
  const LoggedStep logged{4, 2.0, 1.0, {0.25f, 0.75f}, {1.0f, 2.0f}, {1.0f, 3.0f}};
  const std::vector<std::string> names{"a", "b"};
  EXPECT_FALSE(compare_step(logged, logged, names).has_value());
  LoggedStep other = logged;
  other.loss = std::nextafter(2.0, 3.0);  // one ulp
  auto m = compare_step(logged, other, names);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->step, 4);
  EXPECT_EQ(m->what, "loss");
  EXPECT_EQ(keel::forensics::describe(*m).rfind("step 4: loss differs (logged 2, replayed 2.0000000000000004)", 0), 0u)
      << keel::forensics::describe(*m);
  other = logged;
  other.tensor_param_norms[1] = std::nextafter(2.0f, 3.0f);
  m = compare_step(logged, other, names);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->what, "tensor_param_norm b");
  other = logged;
  other.sample_losses[1] = 3.5f;
  m = compare_step(logged, other, names);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->what, "sample_loss slot 1");
  // A NaN equals the same NaN; a side that logged no per-tensor norms is not compared on them.
  LoggedStep nan_step = logged;
  nan_step.grad_norm = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(compare_step(nan_step, nan_step, names).has_value());
  other = logged;
  other.tensor_grad_norms.clear();
  EXPECT_FALSE(compare_step(logged, other, names).has_value());
}

TEST(ReplayCheck, ResumeWindowChecksOnlyTheStepsTheParentLogged) {
  const std::string path = write_run({row(0, 2.0, 1.0f), row(1, 2.5, 2.0f), row(2, 2.25, 1.5f)});
  const auto run = keel::forensics::read_logged_run(path);
  const ReplayCheck check(path, 1, 5);  // steps 1..5 wanted; the parent logged 1 and 2
  EXPECT_EQ(check.overlap(), 2);
  EXPECT_FALSE(check.covers(0));
  EXPECT_TRUE(check.covers(2));
  EXPECT_FALSE(check.covers(3));
  EXPECT_NO_THROW(check.check(run.steps.at(1)));
  LoggedStep changed = run.steps.at(2);
  changed.grad_norm += 1e-9;
  try {
    check.check(changed);
    FAIL() << "expected a mismatch";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("resume.verify_steps: step 2: grad_norm differs"), std::string::npos) << what;
    EXPECT_NE(what.find(path), std::string::npos) << what;
  }
  EXPECT_THROW(ReplayCheck(test_dir() + "/missing.h5", 0, 1), std::runtime_error);
}

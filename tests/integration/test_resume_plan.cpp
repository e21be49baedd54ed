// Why: train::plan_resume (core/train/resume_plan.h) decides, in-process and before anything is written, what a
// `keel resume` continues from: the checkpoint's config plus overrides, the data checked against its
// fingerprint, every tensor read, and the new branch's lineage. These tests call it directly on a checkpoint a
// real 2-step run wrote: a clean plan, then each refusal with its one-line message naming the checkpoint and key
// (the binary's messages are tested in test_checkpoint_resume.cpp; here the function is the unit).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/train/resume_plan.h"
#include "tests/integration/keel_process.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;
using keel::testing::fresh_dir;
using keel::testing::run_keel;
using keel::testing::tiny_args;

// A finished 2-step run of the tiny config (checkpoint at the end), made once for the whole suite.
class ResumePlanTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    run_ = fresh_dir("resume-plan");
    const auto r = run_keel("train " + tiny_args("--set train.steps=2") + " --run-dir " + run_);
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { fs::remove_all(run_); }

  static std::string error_of(const std::vector<std::string>& overrides, const std::string& run_dir,
                              bool allow_data_change = false) {
    const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run_);
    try {
      plan_resume(ckpt, run_dir, overrides, allow_data_change);
    } catch (const std::exception& e) {
      return e.what();
    }
    return "(no error)";
  }

  static std::string run_;
};
std::string ResumePlanTest::run_;

TEST_F(ResumePlanTest, CleanPlanCarriesTheCheckpointsConfigStateAndLineage) {
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run_);
  ASSERT_TRUE(ckpt.warnings.empty());
  const std::string target = fresh_dir("resume-plan-target");
  const ResumePlan plan = plan_resume(ckpt, target, {"train.steps=4"}, false);
  EXPECT_EQ(plan.config.train.steps, 4);
  EXPECT_EQ(plan.state.step, 2);
  EXPECT_FALSE(plan.state.model.empty());
  ASSERT_NE(plan.loader, nullptr);
  EXPECT_EQ(plan.lineage.parent_run_id, ckpt.manifest.run_id);
  EXPECT_EQ(plan.lineage.parent_checkpoint, ckpt.dir);
  EXPECT_EQ(plan.lineage.parent_step, 2);
  EXPECT_EQ(fs::weakly_canonical(plan.lineage.parent_run_dir), fs::weakly_canonical(run_));
  EXPECT_FALSE(plan.lineage.data_change_allowed);
  bool steps_change_recorded = false;
  for (const auto& change : plan.lineage.changes) steps_change_recorded |= change.key == "train.steps";
  EXPECT_TRUE(steps_change_recorded);
  EXPECT_FALSE(fs::exists(target)) << "planning writes nothing";
}

TEST_F(ResumePlanTest, ModelChangeIsRefusedNamingTheKey) {
  const std::string message = error_of({"model.d_model=128"}, fresh_dir("resume-plan-model"));
  EXPECT_NE(message.find("model.d_model differs: checkpoint "), std::string::npos) << message;
  EXPECT_NE(message.find("(a checkpoint resumes only into the same model shape)"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "one line: " << message;
}

TEST_F(ResumePlanTest, GlobalBatchChangeIsPlannedAndRecordedAsAConfigChange) {
  // The data ledger continues from its next sample (docs/data.md); the trainer adopts the new batch at restore.
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run_);
  const ResumePlan plan = plan_resume(ckpt, fresh_dir("resume-plan-batch"), {"train.grad_accum=4"}, false);
  EXPECT_EQ(plan.config.global_batch(), 32);
  bool recorded = false;
  for (const auto& change : plan.lineage.changes)
    recorded |= change.key == "train.grad_accum" && change.from == "2" && change.to == "4";
  EXPECT_TRUE(recorded);
  EXPECT_EQ(plan.lineage.kind(), "branch");
  // A batch the layout cannot split is a config error naming the key.
  const std::string message = error_of({"train.batch_schedule=0:16;3:20"}, fresh_dir("resume-plan-bad-schedule"));
  EXPECT_NE(message.find("train.batch_schedule: the global batch from step 3 (20) must be divisible"),
            std::string::npos)
      << message;
}

TEST_F(ResumePlanTest, RunDirHoldingTheCheckpointIsRefused) {
  const std::string message = error_of({}, run_);
  EXPECT_NE(message.find("contains the checkpoint being resumed"), std::string::npos) << message;
  EXPECT_NE(message.find("resume into a new directory"), std::string::npos) << message;
}

TEST_F(ResumePlanTest, BadOverrideIsAConfigErrorNotAPlan) {
  const std::string message = error_of({"train.no_such_key=1"}, fresh_dir("resume-plan-bad-key"));
  EXPECT_NE(message.find("no_such_key"), std::string::npos) << message;
}

}  // namespace
}  // namespace keel::train

// Why: the Trainer is the core of Keel, so it is tested as a library, without the `keel` binary: a test builds a
// Trainer from a Config, a DataLoader and a claimed run dir, runs steps, saves, restores into a second Trainer and
// compares. This is where a refactor of core/train shows a changed step first (the golden run checks the binary).
// Tiny shapes on the bundled corpus (the keel_data fixture); fp32 so that the comparisons are exact.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"
#include "core/data/loader.h"
#include "core/metrics/metrics_reader.h"
#include "core/train/run_dir.h"
#include "core/train/trainer.h"
#include "keel_process.h"

namespace fs = std::filesystem;
using keel::Config;
using keel::metrics::MetricsReader;
using keel::train::Trainer;
using namespace keel::testing;

namespace {

Config tiny(int64_t steps, const std::vector<std::string>& more = {}) {
  std::vector<std::string> overrides = {"data.dir=" + std::string(KEEL_TEST_DATA_DIR),
                                        "train.steps=" + std::to_string(steps),
                                        "train.precision=fp32",
                                        "train.micro_batch=2",
                                        "train.grad_accum=2",
                                        "train.log_every=1000",
                                        "checkpoint.every=3"};
  overrides.insert(overrides.end(), more.begin(), more.end());
  return keel::load_config(tiny_config(), overrides);
}

// A Trainer over a freshly claimed run dir, as `keel train` builds one (rank 0 of one process).
struct InProcessRun {
  keel::train::RunDirClaim claim;
  std::unique_ptr<Trainer> trainer;

  InProcessRun(const Config& config, const std::string& dir, keel::checkpoint::Lineage lineage = {}) {
    claim = keel::train::create_run_dir(dir, /*force=*/false);
    lineage.run_id = keel::checkpoint::new_run_id();
    lineage.run_dir = dir;
    auto loader = std::make_unique<keel::data::DataLoader>(config, config.global_batch());
    trainer = std::make_unique<Trainer>(config, claim.paths, std::move(loader), lineage);
  }
};

std::vector<double> losses(const std::string& run_dir) {
  return MetricsReader(run_dir + "/metrics.h5").read_double("/train/loss");
}

}  // namespace

TEST(TrainerInProcess, RunsStepsAndWritesMetricsAndCheckpoints) {
  const std::string dir = fresh_dir("trainer_steps");
  keel::train::TrainSummary summary;
  {
    InProcessRun run(tiny(4), dir);
    summary = run.trainer->train();
  }
  EXPECT_EQ(summary.steps_run, 4);
  EXPECT_EQ(summary.last_step, 3);
  EXPECT_FALSE(summary.stopped_by_signal);
  EXPECT_GT(summary.first_loss, 6.0);  // ~ln(2048) = 7.6 at init
  EXPECT_EQ(fs::path(summary.last_checkpoint).filename(), keel::checkpoint::step_dir_name(4));
  EXPECT_TRUE(fs::exists(dir + "/checkpoints/" + keel::checkpoint::step_dir_name(3)));
  const auto loss = losses(dir);
  ASSERT_EQ(loss.size(), 4u);
  EXPECT_EQ(loss.front(), summary.first_loss);
  EXPECT_EQ(loss.back(), summary.last_loss);
}

TEST(TrainerInProcess, RestoredTrainerContinuesBitExactly) {
  const std::string straight = fresh_dir("trainer_straight");
  {
    InProcessRun run(tiny(6), straight);
    run.trainer->train();
  }
  // A second Trainer restored from the straight run's checkpoint after 3 steps must train steps 3..5 to the same
  // losses, bit for bit: weights, AdamW moments, RNG and the data ledger all come back.
  const std::string ckpt = straight + "/checkpoints/" + keel::checkpoint::step_dir_name(3);
  const auto resolved = keel::checkpoint::resolve_checkpoint(ckpt);
  const auto state = keel::checkpoint::read_full_state(resolved.dir, resolved.manifest, 0);
  const std::string resumed = fresh_dir("trainer_resumed");
  keel::checkpoint::Lineage lineage;
  lineage.parent_checkpoint = resolved.dir;
  lineage.parent_step = 3;
  {
    InProcessRun run(tiny(6), resumed, lineage);
    run.trainer->restore(state, /*allow_data_change=*/false);
    const auto summary = run.trainer->train();
    EXPECT_EQ(summary.steps_run, 3);
    EXPECT_EQ(summary.last_step, 5);
  }
  const auto a = losses(straight);
  const auto b = losses(resumed);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(a[3 + i], b[i]) << "step " << 3 + i;
}

TEST(TrainerInProcess, RestoreRefusesAnotherModelShapeNamingTheTensor) {
  const std::string source = fresh_dir("trainer_shape_src");
  {
    InProcessRun run(tiny(3), source);
    run.trainer->train();
  }
  const auto resolved =
      keel::checkpoint::resolve_checkpoint(source + "/checkpoints/" + keel::checkpoint::step_dir_name(3));
  const auto state = keel::checkpoint::read_full_state(resolved.dir, resolved.manifest, 0);
  InProcessRun wider(tiny(6, {"model.ffn_hidden=192"}), fresh_dir("trainer_shape_dst"));
  try {
    wider.trainer->restore(state, false);
    FAIL() << "a checkpoint of another shape was accepted";
  } catch (const keel::checkpoint::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("mlp"), std::string::npos) << e.what();
  }
}

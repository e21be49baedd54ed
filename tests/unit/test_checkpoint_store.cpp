// Why: the directory protocol of checkpoints without training anything: commit makes a valid step-N and moves
// `latest`; a .tmp, a directory without manifest, a flipped byte or a truncated file is never valid, never
// loaded and never counted; retention keeps exactly the newest K plus milestones, also after a kill mid-prune;
// resolve_checkpoint falls back (with a warning naming the damage) only from a run dir. Also the lineage.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "../common/damage.h"

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/sha256.h"
#include "test_support.h"

using namespace keel::checkpoint;
namespace fs = std::filesystem;

namespace {

// A small but complete checkpoint: a fake rank file and config.ini, committed through the store.
std::string save_fake(CheckpointStore& store, int64_t step) {
  const std::string tmp = store.begin(step);
  std::ofstream(tmp + "/" + rank_file_name(0), std::ios::binary) << "rank payload of step " << step;
  std::ofstream(tmp + "/config.ini") << "[model]\nlayers = 2\n";
  Manifest m;
  m.keel_version = "test";
  m.run_id = "run-test";
  m.created = "2026-11-22T00:00:00Z";
  m.config_hash = sha256_hex("x");
  return store.commit(step, m, {{rank_file_name(0), 0}, {"config.ini", -1}});
}

std::vector<int64_t> steps_of(const std::vector<CheckpointEntry>& entries) {
  std::vector<int64_t> out;
  for (const auto& e : entries) out.push_back(e.step);
  return out;
}

}  // namespace

TEST(CheckpointStore, StepDirectoryNames) {
  EXPECT_EQ(step_dir_name(100), "step-00000100");
  EXPECT_EQ(parse_step_dir_name("step-00000100"), 100);
  EXPECT_EQ(parse_step_dir_name("step-123456789"), 123456789);
  EXPECT_FALSE(parse_step_dir_name("step-00000100.tmp"));
  EXPECT_FALSE(parse_step_dir_name("step-0000010"));
  EXPECT_FALSE(parse_step_dir_name("latest"));
}

TEST(CheckpointStore, CommitMakesAValidCheckpointAndMovesLatest) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  const std::string dir = save_fake(store, 5);
  EXPECT_EQ(dir, root + "/step-00000005");
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  EXPECT_EQ(verify_checkpoint_dir(dir).step, 5);
  EXPECT_EQ(store.latest_pointer(), dir);
  save_fake(store, 10);
  EXPECT_EQ(store.latest_pointer(), root + "/step-00000010");
  EXPECT_EQ(steps_of(store.list_valid()), (std::vector<int64_t>{5, 10}));
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { store.begin(10); }).find("step-00000010 already exists"), std::string::npos);
}

TEST(CheckpointStore, IncompleteOrDamagedDirectoriesAreNeverValid) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  save_fake(store, 1);
  save_fake(store, 2);
  save_fake(store, 3);
  save_fake(store, 4);
  fs::create_directories(root + "/step-00000009.tmp");       // a save killed before its rename
  fs::create_directories(root + "/step-00000008");           // no manifest
  keel::testing::flip_byte(root + "/step-00000003/rank-00000.h5", 3);       // bit rot
  fs::resize_file(root + "/step-00000004/config.ini", 4);    // truncated
  CheckpointStore fresh(root);                               // no remembered verifications
  EXPECT_EQ(steps_of(fresh.list_valid()), (std::vector<int64_t>{1, 2}));
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000003"); }).find("rank-00000.h5: corrupted"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000004"); }).find("config.ini: truncated"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000008"); }).find("incomplete checkpoint"),
            std::string::npos);
}

TEST(CheckpointStore, RetentionKeepsNewestKPlusMilestones) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  for (int64_t step = 1; step <= 10; ++step) {
    save_fake(store, step);
    store.prune(/*keep_last=*/2, /*milestone_every=*/4);
  }
  EXPECT_EQ(steps_of(store.list()), (std::vector<int64_t>{4, 8, 9, 10}));
  CheckpointStore keep_all(root);
  save_fake(keep_all, 11);
  EXPECT_TRUE(keep_all.prune(0, 0).empty());
  EXPECT_EQ(steps_of(keep_all.list()), (std::vector<int64_t>{4, 8, 9, 10, 11}));
}

TEST(CheckpointStore, DamagedCheckpointsAreNotCountedAndAKillMidPruneIsFinished) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  {
    CheckpointStore store(root);
    for (int64_t step = 1; step <= 4; ++step) save_fake(store, step);
  }
  // What a kill during prune leaves: a directory renamed for deletion and half removed.
  fs::rename(root + "/step-00000001", root + "/step-00000001.deleting");
  fs::remove(root + "/step-00000001.deleting/manifest.json");
  keel::testing::flip_byte(root + "/step-00000004/rank-00000.h5", 0);  // the newest is damaged: it must not count as a keeper
  CheckpointStore store(root);
  const auto removed = store.prune(2, 0);
  EXPECT_FALSE(fs::exists(root + "/step-00000001.deleting"));
  // Valid: 2, 3 -> both kept (K = 2); the damaged 4 is left alone for a human to look at.
  EXPECT_TRUE(removed.empty());
  EXPECT_EQ(steps_of(store.list()), (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(steps_of(store.list_valid()), (std::vector<int64_t>{2, 3}));
}

TEST(ResolveCheckpoint, RunDirFallsBackToNewestValidWithAWarning) {
  const std::string run = keel::testing::test_dir();
  CheckpointStore store(run + "/checkpoints");
  save_fake(store, 5);
  save_fake(store, 10);
  EXPECT_EQ(resolve_checkpoint(run).dir, run + "/checkpoints/step-00000010");
  keel::testing::flip_byte(run + "/checkpoints/step-00000010/rank-00000.h5", 2);
  const ResolvedCheckpoint r = resolve_checkpoint(run);
  EXPECT_EQ(r.dir, run + "/checkpoints/step-00000005");
  EXPECT_EQ(r.manifest.step, 5);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("step-00000010/rank-00000.h5: corrupted"), std::string::npos);
  // An explicit checkpoint never falls back.
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { resolve_checkpoint(run + "/checkpoints/step-00000010"); }).find("corrupted"), std::string::npos);
  // Nothing valid: an error naming each damaged checkpoint, never step 0.
  keel::testing::flip_byte(run + "/checkpoints/step-00000005/config.ini", 0);
  const std::string all_bad = keel::testing::checkpoint_error_of([&] { resolve_checkpoint(run); });
  EXPECT_NE(all_bad.find("no valid checkpoint"), std::string::npos);
  EXPECT_NE(all_bad.find("step-00000005/config.ini"), std::string::npos);
  EXPECT_NE(all_bad.find("step-00000010/rank-00000.h5"), std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { resolve_checkpoint(run + "/nope"); }).find("no such checkpoint"), std::string::npos);
}

TEST(Lineage, DiffKindJsonAndTree) {
  const auto changes = diff_configs({{"optim.lr", "0.001"}, {"train.steps", "10"}, {"model.layers", "2"}},
                                    {{"optim.lr", "0.0005"}, {"train.steps", "20"}, {"model.layers", "2"}});
  ASSERT_EQ(changes.size(), 2u);
  EXPECT_EQ(changes[0].key, "optim.lr");
  EXPECT_EQ(changes[0].from, "0.001");
  EXPECT_EQ(changes[0].to, "0.0005");

  Lineage root;
  root.run_id = "run-a";
  root.run_dir = "runs/base";
  root.created = "1";
  Lineage cont;
  cont.run_id = "run-b";
  cont.run_dir = "runs/more";
  cont.created = "2";
  cont.parent_run_id = "run-a";
  cont.parent_step = 10;
  cont.changes = {{"train.steps", "10", "20"}};
  Lineage branch = cont;
  branch.run_id = "run-c";
  branch.run_dir = "runs/lr";
  branch.created = "3";
  branch.changes = {{"optim.lr", "0.001", "0.0005"}};
  EXPECT_EQ(root.kind(), "root");
  EXPECT_EQ(cont.kind(), "continuation");
  EXPECT_EQ(branch.kind(), "branch");

  const Lineage back = parse_lineage(lineage_to_json(branch), "lineage.json");
  EXPECT_EQ(back.parent_run_id, "run-a");
  EXPECT_EQ(back.parent_step, 10);
  EXPECT_EQ(back.changes.at(0).to, "0.0005");
  EXPECT_NE(keel::testing::checkpoint_error_of([] { parse_lineage("{}", "x/lineage.json"); }).find("x/lineage.json"), std::string::npos);

  const std::string tree = format_lineage_tree({branch, root, cont});
  EXPECT_EQ(tree.find("runs/base"), 0u) << tree;
  EXPECT_NE(tree.find("├── runs/more  [run-b]  continuation from step 10"), std::string::npos) << tree;
  EXPECT_NE(tree.find("└── runs/lr  [run-c]  branch from step 10"), std::string::npos) << tree;
  EXPECT_NE(tree.find("optim.lr: 0.001 -> 0.0005"), std::string::npos) << tree;
  EXPECT_NE(new_run_id().find("run-"), std::string::npos);
}

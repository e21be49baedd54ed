// Why: the directory protocol of checkpoints without training anything: commit makes a valid step-N and moves
// `latest`; a .tmp, a directory without manifest, a flipped byte, a truncated file, an unlisted file, an
// edited config.ini or another step's files under a step-N name is never valid, never loaded and never
// counted; retention keeps exactly the newest K plus milestones plus the newest finite one, also after a kill
// mid-prune; resolve_checkpoint takes the newest valid checkpoint of a run dir whatever `latest` says (with a
// warning) and never falls back from an explicit checkpoint. Also the lineage.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "../common/damage.h"
#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/sha256.h"
#include "test_support.h"

using namespace keel::checkpoint;
namespace fs = std::filesystem;

namespace {

constexpr const char* kFakeConfig = "[model]\nlayers = 2\n";

// A small but complete checkpoint: a fake rank file and config.ini, committed through the store. With
// `checked_finite` the rank file is an HDF5 file marked the way write_rank_file marks one whose tensors it
// checked (torch-free, so the store is tested without LibTorch).
std::string save_fake(CheckpointStore& store, int64_t step, bool checked_finite = false) {
  const std::string tmp = store.begin(step);
  if (checked_finite) {
    H5Writer out(tmp + "/" + rank_file_name(0));
    out.set_attribute("/", "tensors_finite", int64_t{1});
    out.close();
  } else {
    std::ofstream(tmp + "/" + rank_file_name(0), std::ios::binary) << "rank payload of step " << step;
  }
  std::ofstream(tmp + "/config.ini") << kFakeConfig;
  Manifest m;
  m.keel_version = "test";
  m.run_id = "run-test";
  m.created = "2026-11-22T00:00:00Z";
  m.config_hash = sha256_hex(kFakeConfig);
  return store.commit(step, m, {{rank_file_name(0), 0}, {"config.ini", -1}});
}

// Rewrites DIR/manifest.json after `edit` (nothing else is recomputed).
void edit_manifest(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = nlohmann::json::parse(read_small_file(dir + "/manifest.json"));
  edit(j);
  std::ofstream(dir + "/manifest.json", std::ios::trunc) << j.dump(2);
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
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { store.begin(10); }).find("step-00000010 already exists"),
            std::string::npos);
}

TEST(CheckpointStore, IncompleteOrDamagedDirectoriesAreNeverValid) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  save_fake(store, 1);
  save_fake(store, 2);
  save_fake(store, 3);
  save_fake(store, 4);
  fs::create_directories(root + "/step-00000009.tmp");                 // a save killed before its rename
  fs::create_directories(root + "/step-00000008");                     // no manifest
  keel::testing::flip_byte(root + "/step-00000003/rank-00000.h5", 3);  // bit rot
  fs::resize_file(root + "/step-00000004/config.ini", 4);              // truncated
  CheckpointStore fresh(root);                                         // no remembered verifications
  EXPECT_EQ(steps_of(fresh.list_valid()), (std::vector<int64_t>{1, 2}));
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              verify_checkpoint_dir(root + "/step-00000003");
            }).find("rank-00000.h5: corrupted"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              verify_checkpoint_dir(root + "/step-00000004");
            }).find("config.ini: truncated"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              verify_checkpoint_dir(root + "/step-00000008");
            }).find("incomplete checkpoint"),
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
  keel::testing::flip_byte(root + "/step-00000004/rank-00000.h5",
                           0);  // the newest is damaged: it must not count as a keeper
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
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              resolve_checkpoint(run + "/checkpoints/step-00000010");
            }).find("corrupted"),
            std::string::npos);
  // Nothing valid: an error naming each damaged checkpoint, never step 0.
  keel::testing::flip_byte(run + "/checkpoints/step-00000005/config.ini", 0);
  const std::string all_bad = keel::testing::checkpoint_error_of([&] { resolve_checkpoint(run); });
  EXPECT_NE(all_bad.find("no valid checkpoint"), std::string::npos);
  EXPECT_NE(all_bad.find("step-00000005/config.ini"), std::string::npos);
  EXPECT_NE(all_bad.find("step-00000010/rank-00000.h5"), std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { resolve_checkpoint(run + "/nope"); }).find("no such checkpoint"),
            std::string::npos);
}

TEST(CheckpointStore, EveryFileMustBeListedAndConfigHashAndStepMustMatch) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  for (int64_t step = 1; step <= 5; ++step) save_fake(store, step);
  // 1: config.ini dropped from the manifest (nothing recomputed) and then edited.
  edit_manifest(root + "/step-00000001", [](nlohmann::json& j) { j["files"].erase(1); });
  std::ofstream(root + "/step-00000001/config.ini", std::ios::app) << "# edited\n";
  const std::string unlisted =
      keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000001"); });
  EXPECT_NE(unlisted.find("step-00000001/config.ini: not listed in manifest.json"), std::string::npos) << unlisted;
  // 2: a file nobody listed.
  std::ofstream(root + "/step-00000002/notes.txt") << "hand-made";
  const std::string extra = keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000002"); });
  EXPECT_NE(extra.find("step-00000002/notes.txt: present but not listed in manifest.json"), std::string::npos) << extra;
  // 3: config.ini edited and re-hashed in files[], but config_hash not.
  std::ofstream(root + "/step-00000003/config.ini", std::ios::trunc) << "[optim]\nlr = 0.5\n";
  edit_manifest(root + "/step-00000003", [&](nlohmann::json& j) {
    j["files"][1]["bytes"] = fs::file_size(root + "/step-00000003/config.ini");
    j["files"][1]["sha256"] = sha256_file(root + "/step-00000003/config.ini");
  });
  const std::string hash = keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000003"); });
  EXPECT_NE(hash.find("step-00000003/config.ini: SHA-256"), std::string::npos) << hash;
  EXPECT_NE(hash.find("config_hash"), std::string::npos) << hash;
  // 4: step 4's files under the name of step 7.
  fs::copy(root + "/step-00000004", root + "/step-00000007");
  const std::string renamed =
      keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000007"); });
  EXPECT_NE(renamed.find("step-00000007: the directory is named for step 7 but its manifest.json says step 4"),
            std::string::npos)
      << renamed;
  EXPECT_NE(
      keel::testing::checkpoint_error_of([&] { resolve_checkpoint(root + "/step-00000007"); }).find("says step 4"),
      std::string::npos);
  CheckpointStore fresh(root);
  EXPECT_EQ(steps_of(fresh.list_valid()), (std::vector<int64_t>{4, 5}));
  // 5: a rank file missing from the manifest of a 1-rank layout is named.
  edit_manifest(root + "/step-00000005", [](nlohmann::json& j) { j["files"].erase(0); });
  const std::string no_rank =
      keel::testing::checkpoint_error_of([&] { verify_checkpoint_dir(root + "/step-00000005"); });
  EXPECT_NE(no_rank.find("rank-00000.h5 is not listed"), std::string::npos) << no_rank;
}

TEST(CheckpointStore, CommitRefusesAnUnlistedFileAndCleansStaleLatestTmp) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  save_fake(store, 1);
  std::ofstream(root + "/latest.tmp-12345") << "step-00000000\n";  // a save killed while replacing `latest`
  const std::string tmp = store.begin(2);
  std::ofstream(tmp + "/" + rank_file_name(0)) << "rank";
  std::ofstream(tmp + "/config.ini") << kFakeConfig;
  std::ofstream(tmp + "/stray.bin") << "?";
  Manifest m;
  m.config_hash = sha256_hex(kFakeConfig);
  const std::string refused = keel::testing::checkpoint_error_of([&] {
    store.commit(2, m, {{rank_file_name(0), 0}, {"config.ini", -1}});
  });
  EXPECT_NE(refused.find("stray.bin is not one of the files being committed"), std::string::npos) << refused;
  EXPECT_FALSE(fs::exists(root + "/step-00000002"));
  EXPECT_TRUE(fs::exists(root + "/latest.tmp-12345")) << "readers and a refused commit leave it alone";
  EXPECT_EQ(store.latest_pointer(), root + "/step-00000001");
  fs::remove(tmp + "/stray.bin");
  store.commit(2, m, {{rank_file_name(0), 0}, {"config.ini", -1}});
  EXPECT_FALSE(fs::exists(root + "/latest.tmp-12345")) << "removed when `latest` is next written";
  EXPECT_EQ(store.latest_pointer(), root + "/step-00000002");
}

TEST(CheckpointStore, RetentionNeverPrunesTheNewestFiniteCheckpoint) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  save_fake(store, 1, /*checked_finite=*/true);
  EXPECT_EQ(verify_checkpoint_dir(root + "/step-00000001").tensors_finite, true);
  // Checkpoints whose tensors were not checked (an older Keel, or files not written by write_rank_file).
  for (int64_t step = 2; step <= 5; ++step) {
    save_fake(store, step);
    store.prune(/*keep_last=*/2, 0);
  }
  EXPECT_EQ(verify_checkpoint_dir(root + "/step-00000005").tensors_finite, false);
  EXPECT_EQ(steps_of(store.list()), (std::vector<int64_t>{1, 4, 5}));
  // Once a newer finite checkpoint exists, the old one is an ordinary candidate again.
  save_fake(store, 6, true);
  store.prune(2, 0);
  EXPECT_EQ(steps_of(store.list()), (std::vector<int64_t>{5, 6}));
}

TEST(ResolveCheckpoint, RunDirTakesTheNewestValidCheckpointWhateverLatestSays) {
  const std::string run = keel::testing::test_dir();
  const std::string root = run + "/checkpoints";
  CheckpointStore store(root);
  save_fake(store, 5);
  save_fake(store, 10);
  // A kill between the rename of step-10 and the move of `latest`, and the temp file of that move.
  write_file_atomically(root + "/latest", "step-00000005\n");
  std::ofstream(root + "/latest.tmp-12345") << "step-00000010\n";
  ResolvedCheckpoint r = resolve_checkpoint(run);
  EXPECT_EQ(r.dir, root + "/step-00000010");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("latest names step-00000005, but step-00000010 is newer and valid"), std::string::npos)
      << r.warnings[0];
  // Dangling.
  write_file_atomically(root + "/latest", "step-00000040\n");
  r = resolve_checkpoint(run);
  EXPECT_EQ(r.dir, root + "/step-00000010");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("latest names step-00000040, which does not exist"), std::string::npos) << r.warnings[0];
  // Missing.
  fs::remove(root + "/latest");
  r = resolve_checkpoint(run);
  EXPECT_EQ(r.dir, root + "/step-00000010");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("latest is missing; loading the newest valid checkpoint, step-00000010"),
            std::string::npos)
      << r.warnings[0];
  // Malformed.
  write_file_atomically(root + "/latest", "garbage\n");
  r = resolve_checkpoint(run);
  EXPECT_EQ(r.dir, root + "/step-00000010");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("does not name a step-XXXXXXXX directory"), std::string::npos) << r.warnings[0];
  // In agreement: no warning.
  write_file_atomically(root + "/latest", "step-00000010\n");
  EXPECT_TRUE(resolve_checkpoint(run).warnings.empty());
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
  EXPECT_NE(keel::testing::checkpoint_error_of([] { parse_lineage("{}", "x/lineage.json"); }).find("x/lineage.json"),
            std::string::npos);
  // A type error names the file and the field, not nlohmann's exception.
  const std::string null_step = keel::testing::checkpoint_error_of(
      [] { parse_lineage(R"({"run_id": "r", "parent": {"run_id": "p", "step": null}})", "x/lineage.json"); });
  EXPECT_EQ(null_step, "x/lineage.json: field 'parent.step': expected an integer, got null");
  const std::string bad_change = keel::testing::checkpoint_error_of(
      [] { parse_lineage(R"({"run_id": "r", "changes": [{"key": "a", "from": "1", "to": 2}]})", "x/lineage.json"); });
  EXPECT_EQ(bad_change, "x/lineage.json: field 'changes[0].to': expected a string, got 2");

  const std::string tree = format_lineage_tree({branch, root, cont});
  EXPECT_EQ(tree.find("runs/base"), 0u) << tree;
  EXPECT_NE(tree.find("├── runs/more  [run-b]  continuation from step 10"), std::string::npos) << tree;
  EXPECT_NE(tree.find("└── runs/lr  [run-c]  branch from step 10"), std::string::npos) << tree;
  EXPECT_NE(tree.find("optim.lr: 0.001 -> 0.0005"), std::string::npos) << tree;
  EXPECT_NE(new_run_id().find("run-"), std::string::npos);
}

TEST(CheckpointStore, CommitTakesTheDigestsTheWritersComputedAndRefusesOneOfAnotherSize) {
  const std::string root = keel::testing::test_dir() + "/checkpoints";
  CheckpointStore store(root);
  Manifest m;
  m.keel_version = "test";
  m.run_id = "run-test";
  m.created = "2026-12-03T00:00:00Z";
  m.config_hash = sha256_hex(kFakeConfig);
  const std::string payload = "rank payload written and hashed by a background writer";
  const std::vector<std::pair<std::string, int64_t>> files = {{rank_file_name(0), 0}, {"config.ini", -1}};
  // The digest a writer computed (an asynchronous save's rank thread) goes into the manifest as given.
  std::string tmp = store.begin(3);
  std::ofstream(tmp + "/" + rank_file_name(0), std::ios::binary) << payload;
  std::ofstream(tmp + "/config.ini") << kFakeConfig;
  const FileDigest digest{static_cast<int64_t>(payload.size()), sha256_hex(payload)};
  const std::string dir = store.commit(3, m, files, {{rank_file_name(0), digest}});
  EXPECT_EQ(verify_checkpoint_dir(dir).step, 3);
  EXPECT_EQ(verify_checkpoint_dir(dir).files.at(0).sha256, digest.sha256);

  // A file whose size is not the one its writer hashed is not committed.
  tmp = store.begin(4);
  std::ofstream(tmp + "/" + rank_file_name(0), std::ios::binary) << payload << " and more";
  std::ofstream(tmp + "/config.ini") << kFakeConfig;
  const std::string error = keel::testing::checkpoint_error_of([&] {
    store.commit(4, m, files, {{rank_file_name(0), digest}});
  });
  EXPECT_NE(
      error.find("cannot commit checkpoint step 4: " + tmp + "/rank-00000.h5 has " +
                 std::to_string(payload.size() + 9) + " bytes, its writer hashed " + std::to_string(payload.size())),
      std::string::npos)
      << error;
  EXPECT_FALSE(store.exists(4));
  EXPECT_EQ(store.latest_pointer(), dir);
}

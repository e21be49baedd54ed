// Why: checkpoints a user copied, edited or half-saved must never load as something they are not. Driven through
// `keel resume` on a real run (tiny config, checkpoints at steps 10, 20, 30): a manifest that leaves out an
// edited config.ini, step 20's files under the name step-00000030, `latest` left one behind (or dangling) by a
// kill with its temp file still there, and a rank file whose JSON holds a null where a number belongs. Each
// refusal is one line naming the file and the field or step, with a non-zero exit and no new run dir.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "core/checkpoint/lineage.h"
#include "core/checkpoint/sha256.h"
#include "faults/fault_support.h"

namespace fs = std::filesystem;
using keel::testing::last_line;
using keel::testing::read_text_file;
using keel::testing::run_keel;

namespace {

class CheckpointFaults : public ::testing::Test {
 protected:
  // One trained run for the whole suite; each test works on its own copy.
  static void SetUpTestSuite() {
    base_ = new std::string(keel::testing::fresh_dir("ckpt-faults-base"));
    const auto r =
        run_keel("train --config " + keel::testing::tiny_config() + " " + keel::testing::test_data_override() +
                 " --run-dir " + *base_ + " --set checkpoint.every=10");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*base_, ec);
    delete base_;
    base_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(fs::exists(*base_ + "/checkpoints/step-00000030/manifest.json")) << "the base run did not train";
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    run_ = keel::testing::fresh_dir("ckpt-" + name);
    fs::copy(*base_, run_, fs::copy_options::recursive);
    new_ = keel::testing::fresh_dir("ckpt-" + name + "-new");
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(run_, ec);
    fs::remove_all(new_, ec);
  }

  std::string ckpt(int64_t step) const {
    char name[32];
    std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
    return run_ + "/checkpoints/" + name;
  }
  keel::testing::ProcessResult resume(const std::string& from) const {
    return run_keel("resume --from " + from + " --run-dir " + new_ + " " + keel::testing::test_data_override() +
                    " --set train.steps=31");
  }
  static void edit_manifest(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = nlohmann::json::parse(read_text_file(dir + "/manifest.json"));
    edit(j);
    std::ofstream(dir + "/manifest.json", std::ios::trunc) << j.dump(2);
  }
  // Replaces `from` by `to` (same length) inside FILE's bytes, then re-hashes its manifest entry, as a user who
  // knows the format would.
  static void patch_and_rehash(const std::string& dir, const std::string& file, const std::string& from,
                               const std::string& to) {
    ASSERT_EQ(from.size(), to.size());
    std::string bytes = read_text_file(dir + "/" + file);
    const size_t at = bytes.find(from);
    ASSERT_NE(at, std::string::npos) << from << " not in " << file;
    ASSERT_EQ(bytes.find(from, at + 1), std::string::npos) << from << " is not unique in " << file;
    bytes.replace(at, from.size(), to);
    std::ofstream(dir + "/" + file, std::ios::binary | std::ios::trunc) << bytes;
    const std::string sha = keel::checkpoint::sha256_file(dir + "/" + file);
    edit_manifest(dir, [&](nlohmann::json& j) {
      for (auto& f : j["files"]) {
        if (f["name"] == file) f["sha256"] = sha;
      }
    });
  }

  static std::string* base_;
  std::string run_, new_;
};

std::string* CheckpointFaults::base_ = nullptr;

}  // namespace

TEST_F(CheckpointFaults, ManifestWithoutConfigIniAndAnEditedConfigIsRefused) {
  const std::string dir = ckpt(30);
  edit_manifest(dir, [](nlohmann::json& j) {
    nlohmann::json kept = nlohmann::json::array();
    for (const auto& f : j["files"]) {
      if (f["name"] != "config.ini") kept.push_back(f);
    }
    j["files"] = kept;
  });
  std::string config = read_text_file(dir + "/config.ini");
  const size_t at = config.find("\nlr = ");
  ASSERT_NE(at, std::string::npos) << config;
  config.replace(at, config.find('\n', at + 1) - at, "\nlr = 0.5");
  std::ofstream(dir + "/config.ini", std::ios::trunc) << config;

  auto r = resume(dir);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel resume: error: " + dir +
                                     "/config.ini: not listed in manifest.json (every file of a checkpoint must be "
                                     "listed with its SHA-256)")
      << r.output;
  EXPECT_FALSE(fs::exists(new_));

  // Listed again with its new size and SHA-256, but config_hash still says what was saved.
  edit_manifest(dir, [&](nlohmann::json& j) {
    j["files"].push_back({{"name", "config.ini"},
                          {"rank", -1},
                          {"bytes", fs::file_size(dir + "/config.ini")},
                          {"sha256", keel::checkpoint::sha256_file(dir + "/config.ini")}});
  });
  r = resume(dir);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(last_line(r.output).find(dir + "/config.ini: SHA-256 "), std::string::npos) << r.output;
  EXPECT_NE(last_line(r.output).find("does not match the manifest's config_hash"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(new_));
}

TEST_F(CheckpointFaults, AnotherStepsFilesUnderAStepNameAreRefused) {
  const std::string dir = ckpt(30);
  fs::remove_all(dir);
  fs::copy(ckpt(20), dir, fs::copy_options::recursive);
  const auto r = resume(dir);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel resume: error: " + dir +
                                     ": the directory is named for step 30 but its manifest.json says step 20 (files "
                                     "of another checkpoint?)")
      << r.output;
  EXPECT_FALSE(fs::exists(new_));
}

TEST_F(CheckpointFaults, RunDirResumeTakesTheNewestValidCheckpointWhenLatestIsBehindOrDangling) {
  // What a kill between the rename of step-00000030 and the move of `latest` leaves.
  std::ofstream(run_ + "/checkpoints/latest", std::ios::trunc) << "step-00000020\n";
  std::ofstream(run_ + "/checkpoints/latest.tmp-12345") << "step-00000030\n";
  auto r = resume(run_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("keel resume: warning: " + run_ +
                          "/checkpoints/latest names step-00000020, but step-00000030 is newer and valid (a save was "
                          "interrupted before it moved latest); loading step-00000030"),
            std::string::npos)
      << r.output;
  auto lineage = keel::checkpoint::parse_lineage(read_text_file(new_ + "/lineage.json"), new_ + "/lineage.json");
  EXPECT_EQ(lineage.parent_step, 30);
  ASSERT_EQ(lineage.notes.size(), 1u);
  EXPECT_NE(lineage.notes[0].find("latest names step-00000020"), std::string::npos) << lineage.notes[0];

  // Dangling: `latest` names a checkpoint that is gone.
  fs::remove_all(new_);
  std::ofstream(run_ + "/checkpoints/latest", std::ios::trunc) << "step-00000040\n";
  r = resume(run_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("latest names step-00000040, which does not exist; loading the newest valid checkpoint, "
                          "step-00000030"),
            std::string::npos)
      << r.output;
  lineage = keel::checkpoint::parse_lineage(read_text_file(new_ + "/lineage.json"), new_ + "/lineage.json");
  EXPECT_EQ(lineage.parent_step, 30);
}

TEST_F(CheckpointFaults, NullOrWrongTypeInRankFileJsonNamesTheFileAndField) {
  // The LR schedule with a null where the LR belongs (how a NaN is written as JSON); same length, re-hashed.
  const std::string dir = ckpt(30);
  patch_and_rehash(dir, "rank-00000.h5", "\"lr\":0.003", "\"lr\":null ");
  auto r = resume(dir);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output),
            "keel resume: error: " + dir + "/rank-00000.h5:/lr_schedule: field 'lr': expected a number, got null")
      << r.output;
  EXPECT_FALSE(fs::exists(new_));

  // The optimizer's own state with an array where its step count belongs.
  const std::string other = ckpt(20);
  patch_and_rehash(other, "rank-00000.h5", "{\"step\": 20}", "{\"step\":[0]}");
  r = resume(other);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel resume: error: " + other +
                                     "/rank-00000.h5:/optimizer/state_json: field 'step': expected an integer, got an "
                                     "array")
      << r.output;
  EXPECT_FALSE(fs::exists(new_));
}

// Why: prepared data and imported models are files a user (or a failing disk) can damage between commands. A
// damaged shard must never be called "up to date" by `keel data prepare` and then refused by `keel train`; train's
// refusal must end with the command that fixes it; and a FIFO or a directory in the place of a shard,
// prepared.json, a raw input or model.safetensors must be refused by name at once, not block forever. Every
// command runs under `timeout`, so a hang fails the test instead of stalling CI.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "faults/fault_support.h"

using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

constexpr int kTimedOut = 124;  // timeout(1)'s exit status

void write_at(const std::string& path, int64_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(offset);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A private copy of the prepared tiny corpus (the test-data fixture), damaged by each test.
class DataFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = fresh_dir("data-" + name);
    run_dir_ = fresh_dir("data-run-" + name);
    fs::copy(KEEL_TEST_DATA_DIR, dir_, fs::copy_options::recursive);
    shard_ = dir_ + "/prose/shard-00000.bin";
    ASSERT_TRUE(fs::is_regular_file(shard_)) << shard_;
  }
  void TearDown() override {
    fs::remove_all(dir_);
    fs::remove_all(run_dir_);
  }
  std::string config_args() const { return "--config " + tiny_config() + " --set data.dir=" + dir_; }
  ProcessResult train() const { return run_keel_within(120, "train " + config_args() + " --run-dir " + run_dir_); }
  ProcessResult prepare(const std::string& extra = "") const {
    return run_keel_within(300, "data prepare " + config_args() + " " + extra);
  }
  std::string rebuild_hint() const {
    return "rebuild with: keel data prepare --config " + tiny_config() + " --set data.dir=" + dir_ + " --force";
  }
  // train refuses the damaged data at once with one line that ends with the command that fixes it; no run dir.
  void expect_train_refuses(const std::string& what) const {
    const ProcessResult r = train();
    ASSERT_NE(r.exit_code, kTimedOut) << "keel train blocked:\n" << r.output;
    EXPECT_NE(r.exit_code, 0) << r.output;
    const std::string line = last_line(r.output);
    EXPECT_EQ(line.rfind("keel train: error: ", 0), 0u) << r.output;
    EXPECT_NE(line.find(what), std::string::npos) << r.output;
    EXPECT_NE(line.find(rebuild_hint()), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(run_dir_)) << "a refused run claimed its run dir";
  }
  // prepare rebuilds a shard whose content is damaged (naming it, its byte offset and what is wrong), never
  // calling it up to date; afterwards the data opens cleanly and a second prepare is up to date.
  void expect_prepare_rebuilds(const std::string& what) const {
    const ProcessResult r = prepare();
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output.find("nothing to do"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("prepared shard damaged: " + shard_ + ": " + what), std::string::npos) << r.output;
    const ProcessResult shown = run_keel_within(60, "data show-batch " + config_args() + " --step 0");
    EXPECT_EQ(shown.exit_code, 0) << shown.output;
    const ProcessResult again = prepare();
    EXPECT_EQ(again.exit_code, 0) << again.output;
    EXPECT_NE(again.output.find("nothing to do"), std::string::npos) << again.output;
  }
  // prepare refuses something other than a file in a file's place, by name, and leaves it where it is.
  void expect_prepare_refuses(const std::string& path, const std::string& what, const std::string& extra = "") const {
    const ProcessResult r = prepare(extra);
    ASSERT_NE(r.exit_code, kTimedOut) << "keel data prepare blocked:\n" << r.output;
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output.find("nothing to do"), std::string::npos) << r.output;
    EXPECT_EQ(last_line(r.output),
              "keel data: error: " + path + ": " + what + ": Keel does not replace it; move it away and prepare again");
  }

  std::string dir_, run_dir_, shard_;
};

}  // namespace

TEST_F(DataFaults, ShardWithBadMagicIsRefusedByTrainAndRebuiltByPrepare) {
  write_at(shard_, 0, "GARBAGE!");
  expect_train_refuses(shard_ + ": offset 0: bad magic \"GARBAGE!\", expected \"KEELTOK1\"");
  expect_prepare_rebuilds("offset 0: bad magic");
}

TEST_F(DataFaults, ShardWithATokenPastTheVocabAtTheSameSizeIsRefusedAndRebuilt) {
  const auto size = fs::file_size(shard_);
  write_at(shard_, 32 + 2 * 1000, "\xff\xff");  // token 1000 becomes 65535 (vocab 2048); the size is unchanged
  ASSERT_EQ(fs::file_size(shard_), size);
  expect_train_refuses(shard_ + ": offset 2032: token id 65535 >= vocab 2048 (token 1000)");
  expect_prepare_rebuilds("offset 2032: token id 65535 >= vocab 2048");
}

TEST_F(DataFaults, FifoInPlaceOfAShardIsRefusedWithoutBlocking) {
  fs::remove(shard_);
  ASSERT_EQ(::mkfifo(shard_.c_str(), 0600), 0);
  expect_train_refuses(shard_ + ": is a FIFO, not a shard file; move it away, then ");
  expect_prepare_refuses(shard_, "is a FIFO, not a shard file");
  expect_prepare_refuses(shard_, "is a FIFO, not a shard file", "--force");
  EXPECT_TRUE(fs::is_fifo(shard_));
}

TEST_F(DataFaults, DirectoryInPlaceOfAShardIsNamedAsSuch) {
  fs::remove(shard_);
  fs::create_directories(shard_ + "/user-file");
  expect_train_refuses(shard_ + ": is a directory, not a shard file; move it away, then ");
  expect_prepare_refuses(shard_, "is a directory, not a shard file");
  expect_prepare_refuses(shard_, "is a directory, not a shard file", "--force");
  EXPECT_TRUE(fs::is_directory(shard_ + "/user-file"));
}

TEST_F(DataFaults, FifoInPlaceOfPreparedJsonIsRefusedWithoutBlocking) {
  const std::string manifest = dir_ + "/prepared.json";
  fs::remove(manifest);
  ASSERT_EQ(::mkfifo(manifest.c_str(), 0600), 0);
  expect_train_refuses(manifest + ": is a FIFO, not a regular file; move it away, then ");
  expect_prepare_refuses(manifest, "is a FIFO, not a regular file");
}

TEST_F(DataFaults, FifoAmongTheRawInputsIsRefusedWithoutBlocking) {
  const std::string fifo = dir_ + "/raw-input";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const ProcessResult r = prepare("--set source.prose.inputs=" + fifo);
  ASSERT_NE(r.exit_code, kTimedOut) << "keel data prepare blocked:\n" << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel data: error: source prose: input " + fifo +
                                     ": is a FIFO, not a regular file (inputs are regular files, directories or "
                                     "globs of them)");
}

TEST_F(DataFaults, ForceRebuildsDataThatLooksUpToDate) {
  const ProcessResult r = prepare("--force");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("reused"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("training BPE tokenizer"), std::string::npos) << r.output;
}

TEST(ModelFaults, FifoInPlaceOfModelSafetensorsIsRefusedByImportHf) {
  const std::string hf = fresh_dir("data-hf-fifo"), run_dir = fresh_dir("data-hf-fifo-run");
  fs::create_directories(hf);
  std::ofstream(hf + "/config.json")
      << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 2048, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
           "rope_theta": 10000, "rope_scaling": null, "hidden_act": "silu", "attention_bias": false,
           "mlp_bias": false, "tie_word_embeddings": false, "torch_dtype": "float32"})";
  const std::string weights = hf + "/model.safetensors";
  ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
  const std::string args =
      "import-hf " + hf + " --run-dir " + run_dir + " --config " + tiny_config() + " " + test_data_override();
  ProcessResult r = run_keel_within(60, args);
  ASSERT_NE(r.exit_code, kTimedOut) << "keel import-hf blocked:\n" << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_line(r.output), "keel import-hf: error: " + weights + ": is a FIFO, not a regular file");
  EXPECT_FALSE(fs::exists(run_dir));

  // config.json as a FIFO: the same, before anything else is read.
  const std::string config_json = hf + "/config.json";
  fs::remove(config_json);
  ASSERT_EQ(::mkfifo(config_json.c_str(), 0600), 0);
  r = run_keel_within(60, args);
  ASSERT_NE(r.exit_code, kTimedOut) << "keel import-hf blocked:\n" << r.output;
  EXPECT_EQ(last_line(r.output), "keel import-hf: error: " + config_json + ": is a FIFO, not a regular file");
  EXPECT_FALSE(fs::exists(run_dir));
  fs::remove_all(hf);
}

// Why: a token shard is the one data file every run trusts blindly, so each way a shard can be wrong (not a
// shard, newer version, unknown dtype, truncated, a token past the vocab, prepared for another vocab, a FIFO or a
// directory in its place) must be refused at open time with the file and byte offset named, and without blocking.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "core/data/shard.h"
#include "test_support.h"

namespace fs = std::filesystem;
using keel::data::DataError;
using keel::data::ShardReader;

namespace {

using keel::testing::test_dir;
const auto error_of = keel::testing::data_error_of;

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void put_u32(std::vector<char>& b, size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[offset + i] = static_cast<char>(v >> (8 * i));
}

}  // namespace

TEST(Shard, RoundTripUint16) {
  const std::string path = test_dir() + "/shard-00000.bin";
  std::vector<int32_t> tokens;
  for (int i = 0; i < 1000; ++i) tokens.push_back((i * 37) % 2048);
  const int64_t bytes = keel::data::write_shard(path, tokens, 2048, 1);
  EXPECT_EQ(bytes, 32 + 2 * 1000);
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(path)), bytes);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  ShardReader reader(path, 2048);
  EXPECT_EQ(reader.num_tokens(), 1000);
  EXPECT_EQ(reader.vocab_size(), 2048);
  EXPECT_EQ(reader.eos_id(), 1);
  EXPECT_EQ(reader.header().dtype, keel::data::kShardDtypeU16);
  EXPECT_EQ(reader.read_all(), tokens);
  std::vector<int64_t> window(5);
  reader.read(10, 5, window.data());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(window[i], tokens[10 + i]);

  // The documented layout, byte by byte.
  const auto b = read_bytes(path);
  EXPECT_EQ(std::string(b.begin(), b.begin() + 8), "KEELTOK1");
  EXPECT_EQ(b[8], 1);                                  // version
  EXPECT_EQ(b[12], 1);                                 // dtype uint16
  EXPECT_EQ(static_cast<unsigned char>(b[16]), 0x00);  // vocab 2048 = 0x0800, little-endian
  EXPECT_EQ(b[17], 0x08);
  EXPECT_EQ(b[20], 1);                                        // eos
  EXPECT_EQ(static_cast<unsigned char>(b[24]), 1000 & 0xff);  // num_tokens
  EXPECT_EQ(b[25], 1000 >> 8);
  EXPECT_EQ(static_cast<unsigned char>(b[32 + 2]), 37);  // tokens[1] = 37
}

TEST(Shard, RoundTripUint32ForLargeVocab) {
  const std::string path = test_dir() + "/big.bin";
  const std::vector<int32_t> tokens = {0, 1, 65535, 65536, 99999};
  EXPECT_EQ(keel::data::write_shard(path, tokens, 100000, 2), 32 + 4 * 5);
  ShardReader reader(path, 100000);
  EXPECT_EQ(reader.header().dtype, keel::data::kShardDtypeU32);
  EXPECT_EQ(reader.read_all(), tokens);
}

TEST(Shard, EmptyShardIsValid) {
  const std::string path = test_dir() + "/empty.bin";
  keel::data::write_shard(path, {}, 512, 1);
  EXPECT_EQ(ShardReader(path, 512).num_tokens(), 0);
}

TEST(Shard, WriteRefusesOutOfRangeTokens) {
  const std::string dir = test_dir();
  EXPECT_NE(error_of([&] {
              keel::data::write_shard(dir + "/x.bin", {1, 2048}, 2048, 1);
            }).find("2048"),
            std::string::npos);
  EXPECT_NE(error_of([&] { keel::data::write_shard(dir + "/x.bin", {1, -1}, 2048, 1); }).find("-1"), std::string::npos);
  EXPECT_NE(error_of([&] { keel::data::write_shard(dir + "/x.bin", {1}, 2048, 4096); }).find("eos_id"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "/x.bin"));
}

class ShardRejection : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = test_dir() + "/shard-00000.bin";
    std::vector<int32_t> tokens(100);
    for (int i = 0; i < 100; ++i) tokens[i] = i;
    keel::data::write_shard(path_, tokens, 2048, 1);
    bytes_ = read_bytes(path_);
  }
  std::string open_error(int64_t expected_vocab = 2048) {
    write_bytes(path_, bytes_);
    return error_of([&] { ShardReader reader(path_, expected_vocab); });
  }
  void expect_error(const std::string& message, const std::string& offset, const std::string& what) {
    EXPECT_NE(message.find(path_), std::string::npos) << message;
    EXPECT_NE(message.find("offset " + offset + ":"), std::string::npos) << message;
    EXPECT_NE(message.find(what), std::string::npos) << message;
  }
  std::string path_;
  std::vector<char> bytes_;
};

TEST_F(ShardRejection, BadMagic) {
  bytes_[0] = 'X';
  expect_error(open_error(), "0", "bad magic");
}

TEST_F(ShardRejection, UnsupportedVersion) {
  put_u32(bytes_, 8, 7);
  expect_error(open_error(), "8", "unsupported version 7");
}

TEST_F(ShardRejection, UnknownDtype) {
  put_u32(bytes_, 12, 3);
  expect_error(open_error(), "12", "unknown dtype 3");
}

TEST_F(ShardRejection, Truncated) {
  bytes_.resize(bytes_.size() - 3);
  expect_error(open_error(), std::to_string(bytes_.size()), "truncated");
}

TEST_F(ShardRejection, TrailingBytes) {
  bytes_.push_back(0);
  expect_error(open_error(), std::to_string(32 + 200), "trailing bytes");
}

TEST_F(ShardRejection, ShorterThanHeader) {
  bytes_.resize(10);
  expect_error(open_error(), "10", "truncated");
}

TEST_F(ShardRejection, TokenPastVocab) {
  // Token 57 (byte offset 32 + 57 * 2 = 146) becomes 5000.
  bytes_[146] = static_cast<char>(5000 & 0xff);
  bytes_[147] = static_cast<char>(5000 >> 8);
  expect_error(open_error(), "146", "token id 5000 >= vocab 2048");
}

TEST_F(ShardRejection, VocabMismatch) {
  expect_error(open_error(4096), "16", "vocab_size 2048 != expected vocab 4096");
  // kAnyVocab accepts it.
  write_bytes(path_, bytes_);
  EXPECT_EQ(ShardReader(path_, keel::data::kAnyVocab).vocab_size(), 2048);
}

TEST_F(ShardRejection, MissingFile) {
  const std::string message = error_of([&] { ShardReader reader(path_ + ".nope", 2048); });
  EXPECT_NE(message.find(path_ + ".nope: offset 0: cannot open"), std::string::npos) << message;
}

// Something other than a file in a shard's place: named at once, never waited on (a FIFO with no writer would
// block a plain open forever) and never mmap'ed (a directory used to say "cannot mmap shard: No such device").
TEST_F(ShardRejection, FifoIsRefusedWithoutBlocking) {
  fs::remove(path_);
  ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0);
  EXPECT_EQ(error_of([&] { ShardReader reader(path_, 2048); }), path_ + ": is a FIFO, not a shard file");
}

TEST_F(ShardRejection, DirectoryIsRefusedByName) {
  fs::remove(path_);
  fs::create_directories(path_);
  EXPECT_EQ(error_of([&] { ShardReader reader(path_, 2048); }), path_ + ": is a directory, not a shard file");
}

TEST_F(ShardRejection, WriteDoesNotReplaceADirectoryOrFifo) {
  fs::remove(path_);
  fs::create_directories(path_ + "/keep");
  const std::string message = error_of([&] { keel::data::write_shard(path_, {1, 2, 3}, 2048, 1); });
  EXPECT_NE(message.find(path_ + ": is a directory, not a shard file"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_directory(path_ + "/keep"));
  fs::remove_all(path_);
  ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0);
  EXPECT_NE(error_of([&] { keel::data::write_shard(path_, {1, 2, 3}, 2048, 1); }).find("is a FIFO"), std::string::npos);
  EXPECT_TRUE(fs::is_fifo(path_));
}

// The checks of a prepared shard against its prepared.json entry, shared by the loader and prepare's up-to-date test.
TEST_F(ShardRejection, PreparedShardChecksTokenCountAndEos) {
  write_bytes(path_, bytes_);
  EXPECT_EQ(keel::data::open_prepared_shard(path_, 2048, 100, 1).num_tokens(), 100);
  expect_error(error_of([&] { keel::data::open_prepared_shard(path_, 2048, 99, 1); }), "24",
               "shard has 100 tokens, prepared.json says 99");
  expect_error(error_of([&] { keel::data::open_prepared_shard(path_, 2048, 100, 2); }), "20",
               "eos_id 1 != prepared.json eos_id 2");
  bytes_[146] = static_cast<char>(0xff);
  bytes_[147] = static_cast<char>(0xff);
  write_bytes(path_, bytes_);
  expect_error(error_of([&] { keel::data::open_prepared_shard(path_, 2048, 100, 1); }), "146",
               "token id 65535 >= vocab 2048");
}

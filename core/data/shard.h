// Why: prepared token data lives in flat binary shards that any tool can read without Keel (a 32-byte
// documented header, then raw little-endian token ids; see docs/data.md). The reader validates everything at
// open time — magic, version, dtype, exact size, every token id < vocab, the vocab the caller expects — so that a
// corrupt or stale shard is refused with the file and byte offset named, long before a training step reads
// garbage. Shards are memory-mapped: opening one costs a page-cache scan, not a copy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/data/data_error.h"
#include "core/data/token_stream.h"
#include "core/io/mapped_file.h"

namespace keel::data {

// Layout of the 32-byte header (all integers little-endian):
//   offset  0  char[8]  magic "KEELTOK1"
//   offset  8  u32      version (kShardVersion)
//   offset 12  u32      dtype: 1 = uint16 tokens, 2 = uint32 tokens
//   offset 16  u32      vocab_size (every token id is < vocab_size)
//   offset 20  u32      eos_id
//   offset 24  u64      num_tokens
//   offset 32  tokens   num_tokens * (2 or 4) bytes
inline constexpr char kShardMagic[8] = {'K', 'E', 'E', 'L', 'T', 'O', 'K', '1'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr uint32_t kShardDtypeU16 = 1;
inline constexpr uint32_t kShardDtypeU32 = 2;
inline constexpr int64_t kShardHeaderBytes = 32;
// Pass as expected_vocab to ShardReader to accept any vocab (inspection tools).
inline constexpr int64_t kAnyVocab = -1;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t dtype = kShardDtypeU16;
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
  uint64_t num_tokens = 0;
  int64_t token_bytes() const { return dtype == kShardDtypeU16 ? 2 : 4; }
};

// Write `tokens` as a shard (uint16 when vocab_size <= 65536, else uint32). Writes `path.tmp`, then renames it
// over `path`, so a reader never sees a half-written shard. Throws DataError if a token is out of
// [0, vocab_size), eos_id >= vocab_size, or on I/O failure. Returns the file size in bytes.
int64_t write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size, int64_t eos_id);

// A validated, memory-mapped, read-only shard. Move-only.
class ShardReader : public TokenStream {
 public:
  // Opens and validates `path`. expected_vocab: the vocab the caller's model uses (kAnyVocab skips that check).
  // Throws DataError "PATH: offset N: what" on any problem.
  ShardReader(const std::string& path, int64_t expected_vocab);
  ~ShardReader() override = default;
  ShardReader(ShardReader&& other) noexcept = default;
  ShardReader& operator=(ShardReader&& other) noexcept = default;

  const std::string& path() const override { return path_; }
  const ShardHeader& header() const { return header_; }
  int64_t num_tokens() const override { return static_cast<int64_t>(header_.num_tokens); }
  int64_t vocab_size() const { return header_.vocab_size; }
  int64_t eos_id() const { return header_.eos_id; }
  int64_t file_bytes() const { return file_.size(); }

  // Token i (0 <= i < num_tokens).
  int32_t token(int64_t i) const;
  // Copy tokens [begin, begin + count) into out (widened to int64 for LibTorch).
  void read(int64_t begin, int64_t count, int64_t* out) const override;
  // Copy all tokens (tests, tools).
  std::vector<int32_t> read_all() const;

 private:
  std::string path_;
  ShardHeader header_;
  io::MappedFile file_;  // the whole file, mapped read-only
};

// Maps a token file (a shard, a Megatron .bin, an .npy) for reading in place. Throws DataError "PATH: is a FIFO,
// not NOUN" or "PATH: offset 0: cannot open NOUN: ERRNO" (likewise stat, mmap).
io::MappedFile map_token_file(const std::string& path, const std::string& noun);

// Opens a shard of prepared data exactly as a run does: ShardReader(path, vocab), then its token count and EOS id
// against what prepared.json records for it. `keel train` and the up-to-date check of `keel data prepare` both call
// this, so prepare never calls data "up to date" that train would refuse. Throws DataError "PATH: offset N: what"
// (or "PATH: is a directory, not a shard file").
ShardReader open_prepared_shard(const std::string& path, int64_t vocab, int64_t tokens, int64_t eos_id);

}  // namespace keel::data

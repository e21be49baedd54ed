// Why: labs publish corpora already tokenized — Megatron-LM's indexed datasets (PREFIX.bin + PREFIX.idx, written
// by tools/preprocess_data.py), OLMo's flat token arrays (.npy, or raw uint16/uint32 memmaps). Copying terabytes of
// tokens into Keel shards would double the disk and the prepare time, so Keel reads these files in place: each is
// memory-mapped and validated once when it is opened (header, sizes, offsets, every token id < model.vocab), with
// the file and byte offset named in every error, exactly as ShardReader does for Keel's own shards. After that
// the loader sees a MappedTokens like any other TokenStream (token_stream.h): the permutation, cursor, chunks,
// ledger and the per-step record work unchanged. See docs/data.md, "Pre-tokenized sources".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/data/data_error.h"
#include "core/data/token_stream.h"
#include "core/io/mapped_file.h"
#include "core/io/npy.h"

namespace keel::data {

// The element type of a token array: byte width and signedness.
struct TokenDtype {
  int width = 2;  // bytes: 1, 2, 4 or 8
  bool is_signed = false;
  std::string name() const;  // "uint16", "int32", ...
};

// A validated, memory-mapped, read-only array of `count` little-endian integers at byte `data_offset` of `path`.
// Validated at construction: the file holds exactly data_offset + count * width bytes (trailing bytes are
// refused too) and every token id is in [0, vocab). Move-only.
class MappedTokens : public TokenStream {
 public:
  // Throws DataError "PATH: offset N: what". `what_file` names the kind of file in errors ("Megatron .bin").
  MappedTokens(const std::string& path, int64_t data_offset, TokenDtype dtype, int64_t vocab,
               const std::string& what_file);
  ~MappedTokens() override = default;
  MappedTokens(MappedTokens&& other) noexcept = default;
  MappedTokens& operator=(MappedTokens&& other) noexcept = default;

  const std::string& path() const override { return path_; }
  int64_t num_tokens() const override { return count_; }
  void read(int64_t begin, int64_t count, int64_t* out) const override;
  int64_t token(int64_t i) const;
  int64_t file_bytes() const { return file_.size(); }
  const TokenDtype& dtype() const { return dtype_; }

 private:
  int64_t load(int64_t i) const;  // no range check

  std::string path_;
  TokenDtype dtype_;
  int64_t data_offset_ = 0;
  int64_t count_ = 0;
  io::MappedFile file_;  // the whole file, mapped read-only
};

// ---- Megatron-LM indexed dataset (megatron/core/datasets/indexed_dataset.py) ----
// PREFIX.idx, all integers little-endian:
//   offset  0  char[9]  magic "MMIDIDX\0\0"
//   offset  9  u64      version, 1
//   offset 17  u8       dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
//   offset 18  u64      sequence_count S
//   offset 26  u64      document_count D (document boundaries: number of documents + 1)
//   offset 34  i32      sequence_lengths[S]   (tokens)
//              i64      sequence_pointers[S]  (byte offsets into PREFIX.bin)
//              i64      document_indices[D]   (sequence index where each document starts; first 0, last S)
// PREFIX.bin: the sequences' tokens, back to back.
inline constexpr char kMegatronMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
inline constexpr int64_t kMegatronHeaderBytes = 34;

struct MegatronIndex {
  int dtype_code = 0;
  TokenDtype dtype;
  int64_t sequences = 0;
  int64_t tokens = 0;                    // sum of sequence_lengths; PREFIX.bin is exactly tokens * width bytes
  std::vector<int64_t> document_starts;  // token offset of each document's first token (documents.h)
};

// Parses and checks an .idx held in memory (`path` only names it in errors) against the size of its .bin:
// header, exact file size, lengths >= 0, pointers starting at 0 and each = the previous + its length * width
// (sequences back to back), the last ending at bin_bytes, document indices from 0 ascending strictly to S (an
// empty document is refused). Throws DataError "PATH: offset N: what".
MegatronIndex parse_megatron_index(const std::string& path, const unsigned char* bytes, size_t size, int64_t bin_bytes);

// PREFIX.idx parsed, then PREFIX.bin mapped and checked (every token id < vocab). `prefix` may end in .bin or .idx.
struct MegatronDataset {
  MegatronIndex index;
  MappedTokens tokens;
};
MegatronDataset open_megatron(const std::string& prefix, int64_t vocab);
// "PREFIX" of "PREFIX", "PREFIX.bin" or "PREFIX.idx".
std::string megatron_prefix(const std::string& input);

// ---- NumPy .npy (format 1.0, 2.0, 3.0) and raw token arrays ----
using io::kNpyMagic;

// What a token array needs of an .npy header (core/io/npy.h parses it).
struct NpyHeader {
  TokenDtype dtype;
  int64_t count = 0;        // elements (shape (N,))
  int64_t data_offset = 0;  // where the array starts
};

// Parses an .npy header held in memory (the first bytes of the file; `path` names it in errors) with
// io::parse_npy_header, and requires what a token array is: a little-endian or byte-sized integer type ('<u2',
// '<i4', '|u1', ...; big-endian types are refused) and a 1-D 'shape'. Throws DataError "PATH: offset N: what".
NpyHeader parse_npy_header(const std::string& path, const unsigned char* bytes, size_t size);
// True when the file starts with the .npy magic.
bool is_npy_file(const std::string& path);
// An .npy file mapped and checked. Throws DataError.
MappedTokens open_npy(const std::string& path, int64_t vocab);
// A raw little-endian array of `dtype` ("uint16" or "uint32"), the whole file. Throws DataError.
MappedTokens open_raw_tokens(const std::string& path, const std::string& dtype, int64_t vocab);

// Document starts of a stream whose documents are separated by `eos_id`: 0, then the token after each EOS
// (except an EOS that ends the stream). `stream_offset` is added to each (files concatenated).
void append_eos_document_starts(const TokenStream& tokens, int64_t eos_id, int64_t stream_offset,
                                std::vector<int64_t>& starts);

// ---- JSON lines of token ids (LLM360: one object per line with a "token_ids" array; .gz allowed) ----
// The token ids of every line of `path` (gzip-compressed when the name ends in .gz, decompressed by `gzip -dc`),
// in order; blank lines are skipped. Every line must be a JSON object whose "token_ids" is an array of integers in
// [0, vocab). Throws DataError "PATH: line N: what". JSON cannot be memory-mapped, so prepare parses it once into
// a Keel shard cache (pretokenized_source.h).
std::vector<int32_t> read_jsonl_tokens(const std::string& path, int64_t vocab);
// The same on text already in memory (`path` names it in errors); the fuzz target calls it.
std::vector<int32_t> parse_jsonl_tokens(const std::string& path, const std::string& text, int64_t vocab);

}  // namespace keel::data

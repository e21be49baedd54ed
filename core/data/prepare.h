// Why: `keel data prepare` turns raw text (files, directories, fortune databases) into a tokenizer and token
// shards, once, reproducibly: inputs are listed in a fixed order, the tokenizer sample is a deterministic
// function of the inputs, and DIR/prepared.json (written last, atomically) records a fingerprint of every setting
// and input so that a second run with nothing changed does nothing, and a changed source is redone alone.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/config/config.h"

namespace keel::data {

// Bump when the meaning of prepared data changes (document splitting, EOS placement, shard cutting).
inline constexpr int kPreparedFormatVersion = 1;
// Shards hold at most this many tokens (16 Mi tokens = 32 MiB as uint16).
inline constexpr int64_t kShardMaxTokens = int64_t(1) << 24;

struct PrepareOptions {
  bool force = false;  // redo everything even if prepared.json matches
};

struct PrepareSourceReport {
  std::string name;
  int64_t files = 0;
  int64_t documents = 0;          // trained on
  int64_t heldout_documents = 0;  // held out (docs/data.md#the-held-out-split)
  int64_t raw_bytes = 0;
  int64_t tokens = 0;  // including one EOS per document
  int64_t shards = 0;
  bool reused = false;  // fingerprint matched: shards kept from an earlier prepare
};

struct PrepareReport {
  std::string dir;
  bool up_to_date = false;         // prepared.json already matched the settings: nothing was done
  bool tokenizer_trained = false;  // false when DIR/tokenizer.model was reused
  std::string fingerprint;         // 16 hex digits
  int64_t vocab = 0;
  int32_t eos_id = 0;
  std::vector<PrepareSourceReport> sources;
  double seconds = 0;
};

// Prepare config.data.dir from config.data.sources (see docs/data.md). Idempotent. Throws DataError.
PrepareReport prepare_data(const keel::Config& config, const PrepareOptions& options = {});

// The input files of one source, in the order they are read: each input (file, directory or glob) in the order
// given; directories recursed, files matching `include` (fnmatch on the file name), sorted bytewise by path;
// duplicates (e.g. symlinks to a listed file) dropped; binary files (a NUL byte in the first 8 KiB) and, for
// split=fortune, `*.dat` index files skipped; stopping once the listed files reach max_mb (the last file is kept
// whole). Throws DataError if an input does not exist.
struct InputFile {
  std::string path;
  int64_t bytes = 0;
};
std::vector<InputFile> list_source_files(const keel::SourceConfig& source);

// The held-out split of a source of any format (docs/data.md#the-held-out-split). effective_heldout:
// source.NAME.heldout, the default share when absent. heldout_documents: how many of `documents` are held
// out (a count, or a fraction rounded down but at least 1, never all of them); throws DataError naming the key when
// a count leaves nothing to train on. heldout_document_ids: which, spread evenly over the source's document order
// (ascending, deterministic: the middle document of each of `held` equal stretches).
double effective_heldout(const keel::SourceConfig& source);
int64_t heldout_documents(const keel::SourceConfig& source, int64_t documents);
std::vector<int64_t> heldout_document_ids(int64_t held, int64_t documents);

// The held-out set of source `source` in prepared data DIR (its "heldout" entry in DIR/prepared.json), its
// first max_tokens tokens read (every held-out shard checked as a run checks its shards). nullopt when the source has
// none (source.NAME.heldout = 0, data prepared before held-out sets existed). A pre-tokenized source's set is read
// from its own files (pretokenized_source.h), not opened at all when max_tokens is 0. Throws DataError naming the
// file.
struct HeldoutSet {
  int64_t documents = 0;
  int64_t tokens = 0;         // all of the set's tokens (one EOS per document)
  std::vector<int32_t> head;  // its first min(tokens, max_tokens) tokens
};
std::optional<HeldoutSet> read_heldout(const std::string& dir, const std::string& source, int64_t max_tokens);

// Split one file's text into documents: split=file → the whole text; split=fortune → the pieces between lines
// that are exactly "%". Empty (whitespace-only) documents are dropped.
std::vector<std::string> split_documents(const std::string& text, const std::string& split);

}  // namespace keel::data

// Why: a pre-tokenized source (format = megatron | npy, pretokenized.h) is prepared without copying a token:
// `keel data prepare` lists its files, validates each the way training will open it, writes only its document
// index (DIR/<source>/documents.bin, from Megatron's document index or the EOS positions) and records in
// DIR/prepared.json the files with their size and modification time (the fingerprint that tells prepare "up to
// date" and training "changed since prepare"). Training then maps the same files through
// open_pretokenized_entry. A source's held-out documents (source.NAME.heldout, the same rule as text sources:
// docs/data.md#the-held-out-split) stay in those files too: prepared.json records their token ranges, training
// reads around them and `keel eval` reads them (open_pretokenized_heldout). Text sources keep their own path
// (prepare.cpp); one prepared directory is either all text or all pre-tokenized, because pre-tokenized data carries
// another tokenizer's ids.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/data/prepare.h"
#include "core/data/token_stream.h"

namespace keel::data {

// format = megatron, npy or jsonl-tokens.
bool is_pretokenized(const keel::SourceConfig& source);

// The token files of a pre-tokenized source in stream order: Megatron prefixes (PREFIX of PREFIX.bin/.idx) or
// .npy / raw files; each input a path or a glob (matches sorted bytewise). Throws DataError naming the source
// and input when one does not exist, a glob matches nothing, or an input is a directory.
std::vector<std::string> list_token_files(const keel::SourceConfig& source);

// Opens every token file a prepared.json source entry of a pre-tokenized source lists, in stream order: first
// each recorded file's size and modification time against the file now ("PATH: changed since `keel data
// prepare`"), then the file's full validation (header, sizes, offsets, every token id < vocab), then its token
// count against the record. The streams give the tokens training sees: with a held-out set ("heldout" entry), each
// file less the held-out ranges in it (a file left with none is dropped). Throws DataError naming the file (and
// byte offset, for a damaged file).
std::vector<std::unique_ptr<TokenStream>> open_pretokenized_entry(const nlohmann::json& entry, int64_t vocab);
// The same files, checked the same way, cut to the held-out documents' tokens instead, in stream order (empty when
// the entry has no held-out set).
std::vector<std::unique_ptr<TokenStream>> open_pretokenized_heldout(const nlohmann::json& entry, int64_t vocab);

// prepare_data for a config whose sources are all pre-tokenized (prepare.h); needs data.eos_id. Idempotent.
PrepareReport prepare_pretokenized(const keel::Config& config, const PrepareOptions& options);

}  // namespace keel::data

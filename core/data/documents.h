// Why: a sample is a window of a source's token stream, and documents are packed into that stream, so "which
// documents did step N train on" needs the token offset where every document starts. `keel data prepare` numbers
// each source's documents (0, 1, ... in the order they are read) and writes those offsets to a side file per
// source, DIR/<source>/documents.bin: little-endian int64, one per document, entry k = the token offset (in the
// source's concatenated stream) of document k's first token; document k ends with the EOS just before entry k+1
// (the last one at the end of the stream). prepared.json names the file and its count. The metrics record
// (/data/batch) and `keel data show-batch` map a sample to the documents it covers with DocumentIndex.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel::data {

// The documents a token window [begin, begin + count) of one source covers: documents first_doc ..
// first_doc + n_docs - 1, the window starting `first_doc_offset` tokens into first_doc.
struct DocSpan {
  int64_t first_doc = -1;  // -1 when the source has no document index (prepared by an older Keel)
  int64_t first_doc_offset = 0;
  int64_t n_docs = 0;
};

// Writes `starts` (token offsets of the documents, ascending, starts[0] == 0) to `path` atomically (PATH.tmp,
// then rename). Throws DataError naming the file.
void write_document_index(const std::string& path, const std::vector<int64_t>& starts);
// Reads a file written by write_document_index and checks it: the size is 8 x `documents`, offsets start at 0,
// ascend strictly and stay below `tokens`. Throws DataError naming the file and what is wrong.
std::vector<int64_t> read_document_index(const std::string& path, int64_t documents, int64_t tokens);

// The documents of every source of a prepared directory (DIR/prepared.json's "document_index" entries).
class DocumentIndex {
 public:
  // Reads DIR/prepared.json and each source's index, in the order of `source_names`. A source whose entry has no
  // "document_index" (data prepared by an older Keel) has none: span() returns first_doc = -1 for it and
  // missing() names it. A listed index that is missing or damaged throws DataError naming the file and the fix.
  DocumentIndex(const std::string& dir, const std::vector<std::string>& source_names);

  // The documents of source `source`'s tokens [begin, begin + count).
  DocSpan span(int32_t source, int64_t begin, int64_t count) const;
  // Token offset where document `doc` of `source` starts (for show-batch).
  int64_t document_start(int32_t source, int64_t doc) const;
  // Names of the sources without an index ("" when every source has one).
  std::string missing() const;

 private:
  std::vector<std::string> names_;
  std::vector<std::optional<std::vector<int64_t>>> starts_;
};

}  // namespace keel::data

// Why: see documents.h. The index is a flat int64 array so that numpy reads it with one call
// (np.fromfile(path, "<i8")) and a window maps to its documents by two binary searches.
#include "core/data/documents.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/data/data_error.h"
#include "core/io/file.h"
#include "core/io/regular_file.h"

namespace keel::data {

void write_document_index(const std::string& path, const std::vector<int64_t>& starts) {
  std::string bytes(starts.size() * 8, '\0');  // int64 little-endian, whatever the host
  for (size_t i = 0; i < starts.size(); ++i) {
    for (int b = 0; b < 8; ++b) bytes[i * 8 + b] = static_cast<char>(static_cast<uint64_t>(starts[i]) >> (8 * b));
  }
  try {
    io::write_file_atomically(path, bytes);
  } catch (const io::FileError& e) {
    throw DataError(std::string(e.what()) + " (writing the document index)");
  }
}

std::vector<int64_t> read_document_index(const std::string& path, int64_t documents, int64_t tokens) {
  const std::string text = io::read_regular_file<DataError>(path);
  if (static_cast<int64_t>(text.size()) != documents * 8) {
    throw DataError(path + ": document index is " + std::to_string(text.size()) + " bytes, expected " +
                    std::to_string(documents) + " documents x 8");
  }
  std::vector<int64_t> starts(static_cast<size_t>(documents));
  for (int64_t k = 0; k < documents; ++k) {
    uint64_t v = 0;
    for (int b = 0; b < 8; ++b) v |= static_cast<uint64_t>(static_cast<unsigned char>(text[k * 8 + b])) << (8 * b);
    starts[static_cast<size_t>(k)] = static_cast<int64_t>(v);
    const bool ok = k == 0 ? v == 0 : starts[k] > starts[k - 1] && starts[k] < tokens;
    if (!ok) {
      throw DataError(path + ": document index entry " + std::to_string(k) + " = " + std::to_string(starts[k]) +
                      " is not a valid document start (offsets start at 0, ascend and stay below " +
                      std::to_string(tokens) + " tokens)");
    }
  }
  return starts;
}

DocumentIndex::DocumentIndex(const std::string& dir, const std::vector<std::string>& source_names)
    : names_(source_names), starts_(source_names.size()) {
  const std::string manifest_path = dir + "/prepared.json";
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(io::read_regular_file<DataError>(manifest_path));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(manifest_path + ": unreadable (" + e.what() + ")");
  }
  const std::string fix = "; rebuild with: keel data prepare --config FILE --set data.dir=" + dir + " --force";
  for (size_t i = 0; i < names_.size(); ++i) {
    for (const auto& s : manifest.value("sources", nlohmann::json::array())) {
      if (!s.is_object() || s.value("name", "") != names_[i] || !s.contains("document_index")) continue;
      try {
        const auto& entry = s.at("document_index");
        starts_[i] = read_document_index(dir + "/" + entry.at("file").get<std::string>(),
                                         entry.at("documents").get<int64_t>(), s.at("tokens").get<int64_t>());
      } catch (const nlohmann::json::exception& e) {
        throw DataError(manifest_path + ": source " + names_[i] + ": malformed document_index (" + e.what() + ")" +
                        fix);
      } catch (const DataError& e) {
        throw DataError(e.what() + fix);
      }
    }
  }
}

DocSpan DocumentIndex::span(int32_t source, int64_t begin, int64_t count) const {
  const auto& starts = starts_.at(static_cast<size_t>(source));
  if (!starts || starts->empty() || count <= 0) return {};
  // The last document starting at or before `begin`, and the first one starting at or after the window's end.
  const auto first = std::upper_bound(starts->begin(), starts->end(), begin) - 1;
  const auto end = std::lower_bound(first, starts->end(), begin + count);
  return {first - starts->begin(), begin - *first, end - first};
}

int64_t DocumentIndex::document_start(int32_t source, int64_t doc) const {
  const auto& starts = starts_.at(static_cast<size_t>(source));
  if (!starts || doc < 0 || doc >= static_cast<int64_t>(starts->size())) return -1;
  return (*starts)[static_cast<size_t>(doc)];
}

std::string DocumentIndex::missing() const {
  std::string out;
  for (size_t i = 0; i < names_.size(); ++i) {
    if (!starts_[i]) out += (out.empty() ? "" : ", ") + names_[i];
  }
  return out;
}

}  // namespace keel::data

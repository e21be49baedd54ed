// Why: the file format shared by keel and the keel-spm tool: a sequence of records, each a little-endian u32
// byte length then the bytes. Documents, pieces and token-id arrays all travel this way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::data::spm_io {

inline void write_record(std::FILE* f, const void* data, uint32_t bytes) {
  if (std::fwrite(&bytes, sizeof bytes, 1, f) != 1 || (bytes > 0 && std::fwrite(data, 1, bytes, f) != bytes))
    throw std::runtime_error("short write");
}

inline void write_string(std::FILE* f, const std::string& s) {
  write_record(f, s.data(), static_cast<uint32_t>(s.size()));
}

inline void write_ids(std::FILE* f, const std::vector<int32_t>& ids) {
  write_record(f, ids.data(), static_cast<uint32_t>(ids.size() * sizeof(int32_t)));
}

// Reads one record into `out`; false at a clean end of file, throws on a truncated record.
inline bool read_record(std::FILE* f, std::string& out) {
  uint32_t bytes = 0;
  const size_t got = std::fread(&bytes, 1, sizeof bytes, f);
  if (got == 0) return false;
  if (got != sizeof bytes) throw std::runtime_error("truncated record length");
  out.resize(bytes);
  if (bytes > 0 && std::fread(out.data(), 1, bytes, f) != bytes) throw std::runtime_error("truncated record");
  return true;
}

inline std::vector<int32_t> ids_of(const std::string& record) {
  std::vector<int32_t> ids(record.size() / sizeof(int32_t));
  if (!ids.empty()) std::copy_n(record.data(), ids.size() * sizeof(int32_t), reinterpret_cast<char*>(ids.data()));
  return ids;
}

}  // namespace keel::data::spm_io

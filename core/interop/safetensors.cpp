// Why: the strict safetensors reader and the writer (format and rules: safetensors.h). The reader checks the
// header completely before it copies a single tensor byte, so a malformed file costs nothing but the message.
#include "core/interop/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/io/file.h"
#include "core/io/regular_file.h"

namespace keel::interop {
namespace {

using nlohmann::json;

using Entry = SafetensorsEntry;

[[noreturn]] void fail(const std::string& origin, const std::string& what) {
  throw SafetensorsError(origin + ": " + what);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

uint64_t read_le64(const std::string& bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  return value;
}

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

SafetensorsDtype parse_dtype(const std::string& text, const std::string& where) {
  if (text == "F32") return SafetensorsDtype::kF32;
  if (text == "F16") return SafetensorsDtype::kF16;
  if (text == "BF16") return SafetensorsDtype::kBF16;
  throw SafetensorsError(where + ": dtype '" + text + "' is not supported (Keel reads F32, F16 and BF16 weights)");
}

// numel * element size, refusing products that overflow (a shape is hostile input too).
uint64_t byte_count(const std::vector<int64_t>& shape, int64_t element_size, const std::string& where) {
  uint64_t count = static_cast<uint64_t>(element_size);
  for (int64_t d : shape) {
    const auto dim = static_cast<uint64_t>(d);
    if (dim != 0 && count > std::numeric_limits<uint64_t>::max() / dim) {
      throw SafetensorsError(where + ": shape " + shape_text(shape) + " is too large");
    }
    count *= dim;
  }
  return count;
}

Entry parse_entry(const std::string& name, const json& value, const std::string& origin) {
  const std::string where = origin + ": tensor '" + name + "'";
  if (!value.is_object()) throw SafetensorsError(where + ": entry is not a JSON object");
  for (const auto& [key, _] : value.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      throw SafetensorsError(where + ": unknown field '" + key + "'");
  }
  if (!value.contains("dtype") || !value["dtype"].is_string())
    throw SafetensorsError(where + ": field 'dtype' missing or not a string");
  if (!value.contains("shape") || !value["shape"].is_array())
    throw SafetensorsError(where + ": field 'shape' missing or not an array");
  if (!value.contains("data_offsets") || !value["data_offsets"].is_array() || value["data_offsets"].size() != 2) {
    throw SafetensorsError(where + ": field 'data_offsets' missing or not an array [begin, end]");
  }
  Entry e;
  e.name = name;
  e.dtype = parse_dtype(value["dtype"].get<std::string>(), where);
  for (const json& d : value["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) {
      throw SafetensorsError(where + ": field 'shape' has " + d.dump() + "; dimensions are non-negative integers");
    }
    e.shape.push_back(d.get<int64_t>());
  }
  const json& offsets = value["data_offsets"];
  for (const json& o : offsets) {
    if (!o.is_number_unsigned()) {
      throw SafetensorsError(where + ": field 'data_offsets' has " + o.dump() + "; offsets are non-negative integers");
    }
  }
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  if (e.begin > e.end) {
    throw SafetensorsError(where + ": field 'data_offsets' [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                           "] has begin > end");
  }
  const uint64_t needed = byte_count(e.shape, dtype_size(e.dtype), where);
  if (e.end - e.begin != needed) {
    throw SafetensorsError(where + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes but shape " +
                           shape_text(e.shape) + " of " + dtype_name(e.dtype) + " needs " + std::to_string(needed));
  }
  return e;
}

}  // namespace

std::string dtype_name(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::kF32:
      return "F32";
    case SafetensorsDtype::kF16:
      return "F16";
    case SafetensorsDtype::kBF16:
      return "BF16";
  }
  return "?";
}

int64_t dtype_size(SafetensorsDtype dtype) { return dtype == SafetensorsDtype::kF32 ? 4 : 2; }

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

namespace {

// The header's metadata and entries, checked: every rule of the format, the ranges tiling a data section of
// `data_size` bytes exactly. Entries come back sorted by data offset.
void parse_header(const std::string& header_text, uint64_t data_size, const std::string& origin,
                  std::map<std::string, std::string>& metadata, std::vector<Entry>& entries) {
  const json header = json::parse(header_text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(origin, "header is not valid JSON");
  if (!header.is_object()) fail(origin, "header is not a JSON object");
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(origin, "'__metadata__' is not a JSON object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) fail(origin, "'__metadata__' field '" + key + "' is not a string");
        metadata[key] = text.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, value, origin));
  }

  // The byte ranges must tile the data section exactly: sorted by begin, each starts where the previous ended.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t expected_begin = 0;
  const Entry* previous = nullptr;
  for (const Entry& e : entries) {
    const std::string range = "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
    if (e.end > data_size) {
      fail(origin, "tensor '" + e.name + "': data_offsets " + range + " are out of range: the data section has " +
                       std::to_string(data_size) + " bytes");
    }
    if (e.begin < expected_begin) {
      fail(origin, "tensor '" + e.name + "': data_offsets " + range + " overlap tensor '" + previous->name +
                       "' (which ends at " + std::to_string(expected_begin) + ")");
    }
    if (e.begin > expected_begin) {
      fail(origin, "tensor '" + e.name + "': data_offsets " + range + " leave a gap of " +
                       std::to_string(e.begin - expected_begin) + " bytes before it");
    }
    expected_begin = e.end;
    previous = &e;
  }
  if (expected_begin != data_size) {
    fail(origin,
         std::to_string(data_size - expected_begin) + " bytes at the end of the data section belong to no tensor");
  }
}

// The header length's checks against a file of `file_size` bytes.
void check_header_length(uint64_t header_length, uint64_t file_size, const std::string& origin) {
  if (header_length > kMaxSafetensorsHeaderBytes) {
    fail(origin, "header length " + std::to_string(header_length) + " exceeds the limit of " +
                     std::to_string(kMaxSafetensorsHeaderBytes) + " bytes");
  }
  if (header_length > file_size - 8) {
    fail(origin, "header length " + std::to_string(header_length) + " is beyond the end of the file (" +
                     std::to_string(file_size) + " bytes)");
  }
}

// The header JSON text (padded to 8 bytes) of `entries`, whose ranges it assigns in order.
std::string header_text(const std::map<std::string, std::string>& metadata, std::vector<Entry>& entries,
                        const std::string& origin) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (auto& e : entries) {
    const std::string where = origin + ": tensor '" + e.name + "'";
    if (e.name == "__metadata__" || !names.insert(e.name).second)
      throw SafetensorsError(where + ": duplicate or reserved name");
    for (int64_t d : e.shape) {
      if (d < 0) throw SafetensorsError(where + ": negative dimension in shape " + shape_text(e.shape));
    }
    const uint64_t needed = byte_count(e.shape, dtype_size(e.dtype), where);
    e.begin = offset;
    e.end = offset + needed;
    header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
    offset += needed;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  return text;
}

}  // namespace

SafetensorsFile parse_safetensors(const std::string& file_bytes, const std::string& origin) {
  if (file_bytes.size() < 8) {
    fail(origin, "truncated: " + std::to_string(file_bytes.size()) + " bytes, less than the 8-byte header length");
  }
  const uint64_t header_length = read_le64(file_bytes);
  check_header_length(header_length, file_bytes.size(), origin);
  SafetensorsFile file;
  std::vector<Entry> entries;
  parse_header(file_bytes.substr(8, header_length), file_bytes.size() - 8 - header_length, origin, file.metadata,
               entries);
  const size_t data_start = 8 + header_length;
  for (const Entry& e : entries) {
    file.tensors.push_back({e.name, e.dtype, e.shape, file_bytes.substr(data_start + e.begin, e.end - e.begin)});
  }
  return file;
}

SafetensorsFile read_safetensors(const std::string& path) {
  // Never waits on a FIFO, and names a directory or device in the file's place instead of reading it.
  return parse_safetensors(io::read_regular_file<SafetensorsError>(path), path);
}

std::string serialize_safetensors(const SafetensorsFile& file) {
  std::vector<Entry> entries;
  for (const auto& t : file.tensors) entries.push_back({t.name, t.dtype, t.shape});
  const std::string text = header_text(file.metadata, entries, "safetensors writer");
  uint64_t total = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& t = file.tensors[i];
    if (t.bytes.size() != entries[i].bytes()) {
      throw SafetensorsError("safetensors writer: tensor '" + t.name + "': has " + std::to_string(t.bytes.size()) +
                             " bytes, shape " + shape_text(t.shape) + " of " + dtype_name(t.dtype) + " needs " +
                             std::to_string(entries[i].bytes()));
    }
    total += t.bytes.size();
  }
  std::string out = le64(text.size()) + text;
  out.reserve(out.size() + total);
  for (const auto& t : file.tensors) out += t.bytes;
  return out;
}

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint64_t SafetensorsEntry::bytes() const { return static_cast<uint64_t>(numel()) * dtype_size(dtype); }

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  for (const auto& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

namespace {

// pread of exactly `size` bytes at `offset`, or SafetensorsError naming the file.
void read_exactly(int fd, char* out, uint64_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::pread(fd, out, std::min<uint64_t>(size, uint64_t{1} << 30), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(path, n == 0 ? "unexpected end of file" : std::string("read failed: ") + std::strerror(errno));
    out += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

SafetensorsHeader read_safetensors_header(const std::string& path) {
  struct stat st {};
  Fd fd{io::open_regular_file<SafetensorsError>(path, st)};
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    fail(path, "truncated: " + std::to_string(file_size) + " bytes, less than the 8-byte header length");
  }
  std::string length(8, '\0');
  read_exactly(fd.fd, length.data(), 8, 0, path);
  const uint64_t header_length = read_le64(length);
  check_header_length(header_length, file_size, path);
  std::string text(header_length, '\0');
  read_exactly(fd.fd, text.data(), header_length, 8, path);
  SafetensorsHeader header;
  header.path = path;
  header.data_start = 8 + header_length;
  parse_header(text, file_size - header.data_start, path, header.metadata, header.entries);
  return header;
}

std::string read_safetensors_bytes(const SafetensorsHeader& header, const SafetensorsEntry& entry) {
  struct stat st {};
  Fd fd{io::open_regular_file<SafetensorsError>(header.path, st)};
  const uint64_t expected = header.data_start + (header.entries.empty() ? 0 : header.entries.back().end);
  if (static_cast<uint64_t>(st.st_size) != expected) {
    fail(header.path, "has " + std::to_string(st.st_size) + " bytes now, its header says " + std::to_string(expected) +
                          " (the file changed while it was read)");
  }
  std::string bytes(entry.end - entry.begin, '\0');
  read_exactly(fd.fd, bytes.data(), bytes.size(), header.data_start + entry.begin, header.path);
  return bytes;
}

void write_safetensors_streaming(const std::string& path, const std::map<std::string, std::string>& metadata,
                                 const std::vector<SafetensorsEntry>& entries_in,
                                 const SafetensorsBytesFn& write_tensor) {
  std::vector<Entry> entries = entries_in;
  const std::string text = header_text(metadata, entries, path);
  try {
    io::write_atomically(path, [&](const std::string& tmp) {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) throw SafetensorsError("cannot create file");
      out << le64(text.size()) << text;
      for (size_t i = 0; i < entries.size(); ++i) {
        uint64_t written = 0;
        write_tensor(i, [&](const char* data, size_t size) {
          written += size;
          if (written > entries[i].bytes()) return;
          out.write(data, static_cast<std::streamsize>(size));
        });
        if (written != entries[i].bytes()) {
          throw SafetensorsError("tensor '" + entries[i].name + "': got " + std::to_string(written) +
                                 " bytes, its shape " + shape_text(entries[i].shape) + " of " +
                                 dtype_name(entries[i].dtype) + " needs " + std::to_string(entries[i].bytes()));
        }
        if (!out) throw SafetensorsError("write failed at tensor '" + entries[i].name + "'");
      }
      out.close();
      if (!out) throw SafetensorsError("write failed");
    });
  } catch (const io::FileError& e) {
    throw SafetensorsError(e.what());
  }
}

}  // namespace keel::interop

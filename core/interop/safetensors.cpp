// Why: the strict safetensors reader and the writer (format and rules: safetensors.h). The reader checks the
// header completely before it copies a single tensor byte, so a malformed file costs nothing but the message.
#include "core/interop/safetensors.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/data/regular_file.h"

namespace keel::interop {
namespace {

using nlohmann::json;

struct Entry {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

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

SafetensorsFile parse_safetensors(const std::string& file_bytes, const std::string& origin) {
  if (file_bytes.size() < 8) {
    fail(origin, "truncated: " + std::to_string(file_bytes.size()) + " bytes, less than the 8-byte header length");
  }
  const uint64_t header_length = read_le64(file_bytes);
  if (header_length > kMaxSafetensorsHeaderBytes) {
    fail(origin, "header length " + std::to_string(header_length) + " exceeds the limit of " +
                     std::to_string(kMaxSafetensorsHeaderBytes) + " bytes");
  }
  if (header_length > file_bytes.size() - 8) {
    fail(origin, "header length " + std::to_string(header_length) + " is beyond the end of the file (" +
                     std::to_string(file_bytes.size()) + " bytes)");
  }
  const json header =
      json::parse(file_bytes.begin() + 8, file_bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length), nullptr,
                  /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(origin, "header is not valid JSON");
  if (!header.is_object()) fail(origin, "header is not a JSON object");

  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(origin, "'__metadata__' is not a JSON object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) fail(origin, "'__metadata__' field '" + key + "' is not a string");
        file.metadata[key] = text.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, value, origin));
  }

  // The byte ranges must tile the data section exactly: sorted by begin, each starts where the previous ended.
  const uint64_t data_size = file_bytes.size() - 8 - header_length;
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

  const size_t data_start = 8 + header_length;
  for (const Entry& e : entries) {
    file.tensors.push_back({e.name, e.dtype, e.shape, file_bytes.substr(data_start + e.begin, e.end - e.begin)});
  }
  return file;
}

SafetensorsFile read_safetensors(const std::string& path) {
  // Never waits on a FIFO, and names a directory or device in the file's place instead of reading it.
  return parse_safetensors(data::read_regular_file<SafetensorsError>(path), path);
}

std::string serialize_safetensors(const SafetensorsFile& file) {
  json header = json::object();
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : file.tensors) {
    const std::string where = "safetensors writer: tensor '" + t.name + "'";
    if (t.name == "__metadata__" || !names.insert(t.name).second)
      throw SafetensorsError(where + ": duplicate or reserved name");
    for (int64_t d : t.shape) {
      if (d < 0) throw SafetensorsError(where + ": negative dimension in shape " + shape_text(t.shape));
    }
    const uint64_t needed = byte_count(t.shape, dtype_size(t.dtype), where);
    if (t.bytes.size() != needed) {
      throw SafetensorsError(where + ": has " + std::to_string(t.bytes.size()) + " bytes, shape " +
                             shape_text(t.shape) + " of " + dtype_name(t.dtype) + " needs " + std::to_string(needed));
    }
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + needed}}};
    offset += needed;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  std::string out = le64(text.size()) + text;
  out.reserve(out.size() + offset);
  for (const auto& t : file.tensors) out += t.bytes;
  return out;
}

}  // namespace keel::interop

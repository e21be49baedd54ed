// Why: Hugging Face checkpoints travel as .safetensors files (an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw bytes). Keel reads them from outside
// (`keel import-hf`), so the reader treats the file as hostile input and enforces every rule of the format
// that the safetensors library itself enforces: known dtypes only, ranges that tile the data section exactly
// (no overlap, no gap, nothing out of range), sizes that match the shapes, a sane header length. Errors name
// the file and the tensor or field. Torch-free: tensors are bytes + dtype + shape; hf_llama.cpp converts.
// Host byte order is assumed little-endian (as the format's bytes are), which every platform Keel builds on is.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::interop {

class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The dtypes Keel reads and writes (weights only: fp32 masters, fp16/bf16 exports); any other is refused.
enum class SafetensorsDtype { kF32, kF16, kBF16 };
// "F32" | "F16" | "BF16"
std::string dtype_name(SafetensorsDtype dtype);
int64_t dtype_size(SafetensorsDtype dtype);  // bytes per element

// Headers larger than this are refused before anything is allocated (HF's reader uses the same bound).
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;  // may be empty (a scalar: one element)
  std::string bytes;           // numel * dtype_size(dtype) raw little-endian bytes
  int64_t numel() const;
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;  // the "__metadata__" string map
  std::vector<SafetensorsTensor> tensors;       // in data-offset order when read; write order when written
  const SafetensorsTensor* find(const std::string& name) const;
};

// Parses a whole file's bytes; `origin` (the path) starts every error message.
SafetensorsFile parse_safetensors(const std::string& file_bytes, const std::string& origin);
// Reads and parses `path`.
SafetensorsFile read_safetensors(const std::string& path);
// The file's bytes: header JSON padded with spaces to a multiple of 8 bytes (as HF writes it), then each
// tensor's bytes in order. Throws SafetensorsError naming a tensor whose byte count does not match its shape,
// or a duplicate name.
std::string serialize_safetensors(const SafetensorsFile& file);

// Streaming, for models larger than memory (export-hf, import-hf): the header says what is where, and a writer
// knows every name, dtype and shape before the first byte, so one tensor at a time is in memory.
struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range in the data section (computed by the writer)
  int64_t numel() const;
  uint64_t bytes() const;  // numel * dtype_size
};
struct SafetensorsHeader {
  std::string path;
  std::map<std::string, std::string> metadata;
  std::vector<SafetensorsEntry> entries;  // in data-offset order
  uint64_t data_start = 0;                // file offset of the data section
  const SafetensorsEntry* find(const std::string& name) const;
};
// Reads only the header of `path` (8 + header-length bytes) and checks it exactly as parse_safetensors checks a
// whole file, the file's size standing for the data section: a truncated or padded file is refused here.
SafetensorsHeader read_safetensors_header(const std::string& path);
// One tensor's bytes, read at its range (`entry` from `header`); refuses a file that changed size meanwhile.
std::string read_safetensors_bytes(const SafetensorsHeader& header, const SafetensorsEntry& entry);
// Writes `path` atomically (PATH.tmp-PID, fsync, rename), tensor by tensor: `entries` in file order (their
// begin/end are ignored and computed); `write_tensor(i, write)` is called once per entry, in order, and must
// pass exactly that entry's bytes to `write` (in one or more calls). The same bytes as serialize_safetensors of
// the same tensors. Throws SafetensorsError naming the file and tensor.
using SafetensorsBytesFn =
    std::function<void(size_t index, const std::function<void(const char* data, size_t size)>& write)>;
void write_safetensors_streaming(const std::string& path, const std::map<std::string, std::string>& metadata,
                                 const std::vector<SafetensorsEntry>& entries, const SafetensorsBytesFn& write_tensor);

}  // namespace keel::interop

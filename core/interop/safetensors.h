// Why: Hugging Face checkpoints travel as .safetensors files (an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw bytes). Keel reads them from outside
// (`keel import-hf`), so the reader treats the file as hostile input and enforces every rule of the format
// that the safetensors library itself enforces: known dtypes only, ranges that tile the data section exactly
// (no overlap, no gap, nothing out of range), sizes that match the shapes, a sane header length. Errors name
// the file and the tensor or field. Torch-free: tensors are bytes + dtype + shape; hf_llama.cpp converts.
// Host byte order is assumed little-endian (as the format's bytes are), which every platform Keel builds on is.
#pragma once

#include <cstdint>
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

}  // namespace keel::interop

// Why: the HDF5 layer of a checkpoint, in plain bytes: tensors become datasets with their dtype and shape (so
// `h5py` or `h5dump` read a checkpoint with no Keel code), text (config, ledger, lineage) becomes string
// datasets. The reader treats files as hostile input (it is fuzzed): ranks, dims, dtypes and sizes are checked
// against the file before any allocation. Torch-free on purpose: training_state.h converts to and from tensors.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace keel::checkpoint {

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16, kInt64, kInt32, kUInt8 };

size_t dtype_size(DType dtype);
// "float32", "bfloat16", ... (the `dtype` attribute of every tensor dataset).
std::string dtype_name(DType dtype);

// A tensor as bytes: `shape` is this file's piece; `global_shape`/`offset` place it in the full tensor (equal to
// shape / zeros when unsharded; tensor- and ZeRO-sharded layouts fill them in).
struct RawTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offset;
  std::vector<uint8_t> bytes;  // C order, little-endian
  int64_t numel() const;
};

class H5Writer {
 public:
  // Creates `path`; an existing file is an error (checkpoint files are written once, into a fresh .tmp dir).
  explicit H5Writer(const std::string& path);
  ~H5Writer();
  H5Writer(const H5Writer&) = delete;
  H5Writer& operator=(const H5Writer&) = delete;

  // `object` like "model/embed.weight"; intermediate groups are created.
  void write_tensor(const std::string& object, const RawTensor& tensor);
  void write_text(const std::string& object, const std::string& text);
  void create_group(const std::string& group);
  // Attributes on an existing object ("/" for the file).
  void set_attribute(const std::string& object, const std::string& name, const std::string& value);
  void set_attribute(const std::string& object, const std::string& name, int64_t value);
  // Flushes and closes; throws if HDF5 reports an error. Called by the destructor if not called (errors ignored).
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class H5Reader {
 public:
  explicit H5Reader(const std::string& path);
  ~H5Reader();
  H5Reader(const H5Reader&) = delete;
  H5Reader& operator=(const H5Reader&) = delete;

  bool exists(const std::string& object) const;
  // Paths of every dataset under `group` (recursive), relative to it, in HDF5's name order.
  std::vector<std::string> datasets_under(const std::string& group) const;
  // Names of the direct subgroups of `group`.
  std::vector<std::string> groups_under(const std::string& group) const;
  RawTensor read_tensor(const std::string& object) const;
  // What read_tensor returns, with the same checks, but without reading the tensor's bytes (`bytes` is empty).
  RawTensor tensor_info(const std::string& object) const;
  // Streaming reads: the box [start, start + count) of tensor dataset `object` (coordinates of its stored
  // piece), which must be of `dtype`, copied by one HDF5 hyperslab read into the box at `dest_start` of
  // `dest`, a C-order buffer of `dest_shape` elements of that dtype. Only the box's bytes are read from the
  // file. Throws naming the file and object when the box lies outside the piece or the buffer.
  void read_region(const std::string& object, DType dtype, const std::vector<int64_t>& start,
                   const std::vector<int64_t>& count, void* dest, const std::vector<int64_t>& dest_shape,
                   const std::vector<int64_t>& dest_start) const;
  std::string read_text(const std::string& object) const;
  std::string string_attribute(const std::string& object, const std::string& name) const;
  int64_t int_attribute(const std::string& object, const std::string& name) const;
  const std::string& path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace keel::checkpoint

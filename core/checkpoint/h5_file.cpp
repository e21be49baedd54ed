// Why: see h5_file.h. Every HDF5 call is checked; ids are owned by RAII handles shared with the metrics writer.
#include "core/checkpoint/h5_file.h"

#include <hdf5.h>

#include <algorithm>
#include <cstring>

#include "core/checkpoint/checkpoint_error.h"
#include "core/io/hdf5.h"

namespace keel::checkpoint {
namespace {

using io::Hid;
using io::QuietHdf5Errors;

constexpr int kMaxRank = 8;
constexpr size_t kMaxTextBytes = size_t{256} << 20;
constexpr size_t kMaxListedObjects = 1 << 20;

// One line whatever the file holds: object names read from a damaged file may contain newlines.
[[noreturn]] void fail(const std::string& file, const std::string& object, const std::string& what) {
  std::string message = file + ": " + what + " (object '" + object + "')";
  const std::string detail = io::hdf5_error_text();
  if (!detail.empty()) message += " (HDF5: " + detail + ")";
  throw CheckpointError(io::one_line(message));
}

hid_t check(hid_t id, const std::string& file, const std::string& object, const char* what) {
  if (id < 0) fail(file, object, what);
  return id;
}

struct TypeSpec {
  hid_t file_type;
  hid_t mem_type;
  H5T_class_t type_class;
  size_t size;
  bool is_signed;
};

TypeSpec type_spec(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, H5T_FLOAT, 4, true};
    case DType::kFloat64:
      return {H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, H5T_FLOAT, 8, true};
    // h5py and h5dump have no 16-bit float types that everybody reads; the raw bits are stored as uint16 and
    // the `dtype` attribute says how to view them (numpy: `.view(ml_dtypes.bfloat16)` or shift into fp32).
    case DType::kBFloat16:
      return {H5T_STD_U16LE, H5T_NATIVE_UINT16, H5T_INTEGER, 2, false};
    case DType::kFloat16:
      return {H5T_STD_U16LE, H5T_NATIVE_UINT16, H5T_INTEGER, 2, false};
    case DType::kInt64:
      return {H5T_STD_I64LE, H5T_NATIVE_INT64, H5T_INTEGER, 8, true};
    case DType::kInt32:
      return {H5T_STD_I32LE, H5T_NATIVE_INT32, H5T_INTEGER, 4, true};
    case DType::kUInt8:
      return {H5T_STD_U8LE, H5T_NATIVE_UINT8, H5T_INTEGER, 1, false};
  }
  throw CheckpointError("unknown dtype");
}

const std::vector<std::pair<DType, std::string>>& dtype_names() {
  static const std::vector<std::pair<DType, std::string>> names = {
      {DType::kFloat32, "float32"}, {DType::kFloat64, "float64"}, {DType::kBFloat16, "bfloat16"},
      {DType::kFloat16, "float16"}, {DType::kInt64, "int64"},     {DType::kInt32, "int32"},
      {DType::kUInt8, "uint8"}};
  return names;
}

Hid fixed_string_type(size_t size, const std::string& file, const std::string& object) {
  Hid type(check(H5Tcopy(H5T_C_S1), file, object, "H5Tcopy"));
  check(H5Tset_size(type.get(), std::max<size_t>(1, size)), file, object, "H5Tset_size");
  check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), file, object, "H5Tset_strpad");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), file, object, "H5Tset_cset");
  return type;
}

Hid simple_space(const std::vector<int64_t>& shape, const std::string& file, const std::string& object) {
  if (shape.empty()) return Hid(check(H5Screate(H5S_SCALAR), file, object, "H5Screate"));
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  return Hid(
      check(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), file, object, "H5Screate_simple"));
}

// The shape of a dataspace, refusing anything a checkpoint never contains.
std::vector<int64_t> read_shape(hid_t space, const std::string& file, const std::string& object) {
  const H5S_class_t kind = H5Sget_simple_extent_type(space);
  if (kind == H5S_SCALAR) return {};
  if (kind != H5S_SIMPLE) fail(file, object, "dataspace is neither scalar nor simple");
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 0 || rank > kMaxRank) fail(file, object, "rank " + std::to_string(rank) + " is not in [0, 8]");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(space, dims.data(), nullptr) < 0)
    fail(file, object, "H5Sget_simple_extent_dims");
  return std::vector<int64_t>(dims.begin(), dims.end());
}

}  // namespace

size_t dtype_size(DType dtype) { return type_spec(dtype).size; }

std::string dtype_name(DType dtype) {
  for (const auto& [d, name] : dtype_names()) {
    if (d == dtype) return name;
  }
  return "unknown";
}

int64_t RawTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------------- writer

struct H5Writer::Impl {
  std::string path;
  QuietHdf5Errors quiet;
  Hid file;
  Hid lcpl;  // creates intermediate groups
};

H5Writer::H5Writer(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  Hid fapl = io::make_fapl(path);
  impl_->file =
      Hid(check(H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), path, "/", "cannot create file"));
  impl_->lcpl = Hid(check(H5Pcreate(H5P_LINK_CREATE), path, "/", "H5Pcreate"));
  check(H5Pset_create_intermediate_group(impl_->lcpl.get(), 1), path, "/", "H5Pset_create_intermediate_group");
}

H5Writer::~H5Writer() = default;

void H5Writer::write_tensor(const std::string& object, const RawTensor& t) {
  const std::string& file = impl_->path;
  const TypeSpec spec = type_spec(t.dtype);
  if (static_cast<int64_t>(t.bytes.size()) != t.numel() * static_cast<int64_t>(spec.size))
    fail(file, object, "tensor has " + std::to_string(t.bytes.size()) + " bytes for its shape");
  if (t.shape.size() > kMaxRank) fail(file, object, "rank above 8");
  Hid space = simple_space(t.shape, file, object);
  Hid dset(check(H5Dcreate2(impl_->file.get(), object.c_str(), spec.file_type, space.get(), impl_->lcpl.get(),
                            H5P_DEFAULT, H5P_DEFAULT),
                 file, object, "cannot create dataset"));
  if (!t.bytes.empty()) {
    check(H5Dwrite(dset.get(), spec.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.bytes.data()), file, object, "H5Dwrite");
  }
  set_attribute(object, "dtype", dtype_name(t.dtype));
  if (!t.shape.empty()) {
    const std::vector<int64_t> global = t.global_shape.empty() ? t.shape : t.global_shape;
    const std::vector<int64_t> offset = t.offset.empty() ? std::vector<int64_t>(t.shape.size(), 0) : t.offset;
    if (global.size() != t.shape.size() || offset.size() != t.shape.size())
      fail(file, object, "global_shape/offset do not match the tensor's rank");
    for (const auto& [name, values] : {std::pair<const char*, const std::vector<int64_t>&>{"global_shape", global},
                                       std::pair<const char*, const std::vector<int64_t>&>{"offset", offset}}) {
      const hsize_t n = values.size();
      Hid aspace(check(H5Screate_simple(1, &n, nullptr), file, object, "H5Screate_simple"));
      Hid attr(check(H5Acreate2(dset.get(), name, H5T_STD_I64LE, aspace.get(), H5P_DEFAULT, H5P_DEFAULT), file, object,
                     "H5Acreate2"));
      check(H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()), file, object, "H5Awrite");
    }
  }
}

void H5Writer::write_text(const std::string& object, const std::string& text) {
  const std::string& file = impl_->path;
  Hid type = fixed_string_type(text.size(), file, object);
  Hid space(check(H5Screate(H5S_SCALAR), file, object, "H5Screate"));
  Hid dset(check(H5Dcreate2(impl_->file.get(), object.c_str(), type.get(), space.get(), impl_->lcpl.get(), H5P_DEFAULT,
                            H5P_DEFAULT),
                 file, object, "cannot create dataset"));
  const std::string padded = text.empty() ? std::string(1, '\0') : text;
  check(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, padded.data()), file, object, "H5Dwrite");
}

void H5Writer::create_group(const std::string& group) {
  Hid g(check(H5Gcreate2(impl_->file.get(), group.c_str(), impl_->lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), impl_->path,
              group, "cannot create group"));
}

void H5Writer::set_attribute(const std::string& object, const std::string& name, const std::string& value) {
  const std::string& file = impl_->path;
  Hid type = fixed_string_type(value.size(), file, object);
  Hid space(check(H5Screate(H5S_SCALAR), file, object, "H5Screate"));
  Hid attr(check(H5Acreate_by_name(impl_->file.get(), object.c_str(), name.c_str(), type.get(), space.get(),
                                   H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                 file, object, "cannot create attribute"));
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  check(H5Awrite(attr.get(), type.get(), padded.data()), file, object, "H5Awrite");
}

void H5Writer::set_attribute(const std::string& object, const std::string& name, int64_t value) {
  const std::string& file = impl_->path;
  Hid space(check(H5Screate(H5S_SCALAR), file, object, "H5Screate"));
  Hid attr(check(H5Acreate_by_name(impl_->file.get(), object.c_str(), name.c_str(), H5T_STD_I64LE, space.get(),
                                   H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                 file, object, "cannot create attribute"));
  check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), file, object, "H5Awrite");
}

void H5Writer::close() {
  if (!impl_->file.valid()) return;
  check(H5Fflush(impl_->file.get(), H5F_SCOPE_GLOBAL), impl_->path, "/", "H5Fflush");
  if (!impl_->file.reset()) fail(impl_->path, "/", "H5Fclose");
}

// ---------------------------------------------------------------------------------------------------- reader

struct H5Reader::Impl {
  std::string path;
  QuietHdf5Errors quiet;
  Hid file;
  hsize_t file_size = 0;
};

H5Reader::H5Reader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  Hid fapl = io::make_fapl(path);
  impl_->file = Hid(check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), path, "/", "not a readable HDF5 file"));
  check(H5Fget_filesize(impl_->file.get(), &impl_->file_size), path, "/", "H5Fget_filesize");
}

H5Reader::~H5Reader() = default;

const std::string& H5Reader::path() const { return impl_->path; }

bool H5Reader::exists(const std::string& object) const {
  if (object == "/" || object.empty()) return true;
  try {
    return io::link_exists(impl_->file.get(), object, impl_->path);
  } catch (const std::runtime_error&) {
    return false;  // e.g. a prefix of `object` is a dataset, not a group
  }
}

namespace {

// Collects the names of the hard links whose object is of type `wanted` (datasets or groups).
struct VisitState {
  H5I_type_t wanted;
  std::vector<std::string> names;
  bool too_many = false;
};

herr_t collect_of_type(hid_t group, const char* name, const H5L_info_t* info, void* data) {
  auto* state = static_cast<VisitState*>(data);
  if (info->type != H5L_TYPE_HARD) return 0;
  if (state->names.size() >= kMaxListedObjects) {
    state->too_many = true;
    return 1;
  }
  const hid_t obj = H5Oopen(group, name, H5P_DEFAULT);
  if (obj < 0) return -1;
  const bool match = H5Iget_type(obj) == state->wanted;
  H5Oclose(obj);
  if (match) state->names.emplace_back(name);
  return 0;
}

}  // namespace

std::vector<std::string> H5Reader::datasets_under(const std::string& group) const {
  if (!exists(group)) fail(impl_->path, group, "missing group");
  Hid g(check(H5Gopen2(impl_->file.get(), group.c_str(), H5P_DEFAULT), impl_->path, group, "not a group"));
  VisitState state{H5I_DATASET, {}, false};
  check(H5Lvisit(g.get(), H5_INDEX_NAME, H5_ITER_INC, collect_of_type, &state), impl_->path, group, "H5Lvisit");
  if (state.too_many) fail(impl_->path, group, "too many objects");
  return state.names;
}

std::vector<std::string> H5Reader::groups_under(const std::string& group) const {
  if (!exists(group)) fail(impl_->path, group, "missing group");
  Hid g(check(H5Gopen2(impl_->file.get(), group.c_str(), H5P_DEFAULT), impl_->path, group, "not a group"));
  VisitState state{H5I_GROUP, {}, false};
  hsize_t index = 0;
  check(H5Literate(g.get(), H5_INDEX_NAME, H5_ITER_INC, &index, collect_of_type, &state), impl_->path, group,
        "H5Literate");
  if (state.too_many) fail(impl_->path, group, "too many objects");
  return state.names;
}

namespace {

// A tensor dataset's dtype (its `dtype` attribute, or the stored type), shape and placement, checked against the
// file; `bytes` stays empty.
RawTensor describe_tensor(const H5Reader& reader, hid_t dset, hsize_t file_size, const std::string& object) {
  const std::string& file = reader.path();
  Hid type(check(H5Dget_type(dset), file, object, "H5Dget_type"));
  const H5T_class_t type_class = H5Tget_class(type.get());
  const size_t type_size = H5Tget_size(type.get());
  RawTensor t;
  bool have_dtype = false;
  if (H5Aexists(dset, "dtype") > 0) {
    const std::string name = reader.string_attribute(object, "dtype");
    for (const auto& [d, n] : dtype_names()) {
      if (n == name) {
        t.dtype = d;
        have_dtype = true;
      }
    }
    if (!have_dtype) fail(file, object, "unknown dtype attribute \"" + name + "\"");
  } else {
    const bool is_signed = type_class == H5T_INTEGER && H5Tget_sign(type.get()) == H5T_SGN_2;
    for (const auto& [d, n] : dtype_names()) {
      const TypeSpec s = type_spec(d);
      if (!have_dtype && s.type_class == type_class && s.size == type_size && s.is_signed == is_signed &&
          d != DType::kBFloat16 && d != DType::kFloat16) {
        t.dtype = d;
        have_dtype = true;
      }
    }
    if (!have_dtype) fail(file, object, "datatype is not one a checkpoint tensor uses");
  }
  const TypeSpec spec = type_spec(t.dtype);
  if (type_class != spec.type_class || type_size != spec.size)
    fail(file, object, "stored datatype does not match dtype " + dtype_name(t.dtype));
  Hid space(check(H5Dget_space(dset), file, object, "H5Dget_space"));
  t.shape = read_shape(space.get(), file, object);
  // Bound the allocation by the file: a contiguous, uncompressed tensor cannot hold more bytes than the file.
  __int128 bytes = static_cast<__int128>(spec.size);
  for (int64_t d : t.shape) {
    bytes *= d;
    if (bytes > static_cast<__int128>(file_size)) fail(file, object, "shape is larger than the file");
  }
  for (const auto& [name, out] : {std::pair<const char*, std::vector<int64_t>*>{"global_shape", &t.global_shape},
                                  std::pair<const char*, std::vector<int64_t>*>{"offset", &t.offset}}) {
    if (H5Aexists(dset, name) <= 0) continue;
    Hid attr(check(H5Aopen(dset, name, H5P_DEFAULT), file, object, "H5Aopen"));
    Hid aspace(check(H5Aget_space(attr.get()), file, object, "H5Aget_space"));
    const hssize_t n = H5Sget_simple_extent_npoints(aspace.get());
    Hid atype(check(H5Aget_type(attr.get()), file, object, "H5Aget_type"));
    if (n != static_cast<hssize_t>(t.shape.size()) || H5Tget_class(atype.get()) != H5T_INTEGER)
      fail(file, object, std::string("attribute ") + name + " does not match the tensor's rank");
    out->resize(static_cast<size_t>(n));
    if (n > 0) check(H5Aread(attr.get(), H5T_NATIVE_INT64, out->data()), file, object, "H5Aread");
  }
  if (t.global_shape.empty()) t.global_shape = t.shape;
  if (t.offset.empty()) t.offset.assign(t.shape.size(), 0);
  for (size_t i = 0; i < t.shape.size(); ++i) {
    if (t.offset[i] < 0 || t.global_shape[i] < 0 || t.offset[i] > t.global_shape[i] - t.shape[i])
      fail(file, object, "offset/global_shape do not contain the stored piece");
  }
  return t;
}

// A dataspace selecting the box [start, start + count) of `shape` (the whole scalar for rank 0).
Hid box_space(const std::vector<int64_t>& shape, const std::vector<int64_t>& start, const std::vector<int64_t>& count,
              const std::string& file, const std::string& object) {
  Hid space = simple_space(shape, file, object);
  if (shape.empty()) return space;
  const std::vector<hsize_t> s(start.begin(), start.end()), c(count.begin(), count.end());
  check(H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, s.data(), nullptr, c.data(), nullptr), file, object,
        "H5Sselect_hyperslab");
  return space;
}

// True when [start, start + count) lies in `shape` (all of the same rank).
bool box_inside(const std::vector<int64_t>& shape, const std::vector<int64_t>& start,
                const std::vector<int64_t>& count) {
  if (start.size() != shape.size() || count.size() != shape.size()) return false;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (start[d] < 0 || count[d] < 0 || start[d] > shape[d] - count[d]) return false;
  }
  return true;
}

}  // namespace

RawTensor H5Reader::tensor_info(const std::string& object) const {
  if (!exists(object)) fail(impl_->path, object, "missing dataset");
  Hid dset(check(H5Dopen2(impl_->file.get(), object.c_str(), H5P_DEFAULT), impl_->path, object, "not a dataset"));
  return describe_tensor(*this, dset.get(), impl_->file_size, object);
}

RawTensor H5Reader::read_tensor(const std::string& object) const {
  const std::string& file = impl_->path;
  if (!exists(object)) fail(file, object, "missing dataset");
  Hid dset(check(H5Dopen2(impl_->file.get(), object.c_str(), H5P_DEFAULT), file, object, "not a dataset"));
  RawTensor t = describe_tensor(*this, dset.get(), impl_->file_size, object);
  t.bytes.resize(static_cast<size_t>(t.numel()) * type_spec(t.dtype).size);
  if (!t.bytes.empty()) {
    check(H5Dread(dset.get(), type_spec(t.dtype).mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.bytes.data()), file, object,
          "H5Dread");
  }
  return t;
}

void H5Reader::read_region(const std::string& object, DType dtype, const std::vector<int64_t>& start,
                           const std::vector<int64_t>& count, void* dest, const std::vector<int64_t>& dest_shape,
                           const std::vector<int64_t>& dest_start) const {
  const std::string& file = impl_->path;
  if (!exists(object)) fail(file, object, "missing dataset");
  Hid dset(check(H5Dopen2(impl_->file.get(), object.c_str(), H5P_DEFAULT), file, object, "not a dataset"));
  const RawTensor t = describe_tensor(*this, dset.get(), impl_->file_size, object);
  if (t.dtype != dtype) fail(file, object, "dtype " + dtype_name(t.dtype) + ", expected " + dtype_name(dtype));
  if (!box_inside(t.shape, start, count)) fail(file, object, "the region to read lies outside the stored piece");
  if (!box_inside(dest_shape, dest_start, count)) fail(file, object, "the region to read does not fit its buffer");
  for (int64_t c : count) {
    if (c == 0) return;
  }
  Hid file_space = box_space(t.shape, start, count, file, object);
  Hid mem_space = box_space(dest_shape, dest_start, count, file, object);
  check(H5Dread(dset.get(), type_spec(dtype).mem_type, mem_space.get(), file_space.get(), H5P_DEFAULT, dest), file,
        object, "H5Dread");
}

std::string H5Reader::read_text(const std::string& object) const {
  const std::string& file = impl_->path;
  if (!exists(object)) fail(file, object, "missing dataset");
  Hid dset(check(H5Dopen2(impl_->file.get(), object.c_str(), H5P_DEFAULT), file, object, "not a dataset"));
  Hid type(check(H5Dget_type(dset.get()), file, object, "H5Dget_type"));
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) != 0)
    fail(file, object, "not a fixed-length string dataset");
  const size_t size = H5Tget_size(type.get());
  if (size == 0 || size > kMaxTextBytes || size > impl_->file_size) fail(file, object, "string size out of range");
  Hid space(check(H5Dget_space(dset.get()), file, object, "H5Dget_space"));
  if (H5Sget_simple_extent_type(space.get()) != H5S_SCALAR) fail(file, object, "string dataset is not scalar");
  // Read with the file's own string type (its character set and padding): HDF5 cannot convert ASCII to UTF-8
  // strings, and files written by h5py use ASCII.
  std::string text(size, '\0');
  check(H5Dread(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data()), file, object, "H5Dread");
  text.resize(std::strlen(text.c_str()));
  return text;
}

namespace {

// Opens attribute `name` of `object`, which must exist and be scalar; the caller checks its type.
std::pair<Hid, Hid> open_scalar_attribute(hid_t file_id, const std::string& file, const std::string& object,
                                          const std::string& name) {
  if (H5Aexists_by_name(file_id, object.c_str(), name.c_str(), H5P_DEFAULT) <= 0)
    fail(file, object, "missing attribute '" + name + "'");
  Hid attr(check(H5Aopen_by_name(file_id, object.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), file, object,
                 "H5Aopen_by_name"));
  Hid type(check(H5Aget_type(attr.get()), file, object, "H5Aget_type"));
  Hid space(check(H5Aget_space(attr.get()), file, object, "H5Aget_space"));
  if (H5Sget_simple_extent_type(space.get()) != H5S_SCALAR)
    fail(file, object, "attribute '" + name + "' is not scalar");
  return {std::move(attr), std::move(type)};
}

}  // namespace

std::string H5Reader::string_attribute(const std::string& object, const std::string& name) const {
  const std::string& file = impl_->path;
  if (!exists(object)) fail(file, object, "missing attribute '" + name + "'");
  const auto [attr, type] = open_scalar_attribute(impl_->file.get(), file, object, name);
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) != 0)
    fail(file, object, "attribute '" + name + "' is not a fixed-length scalar string");
  const size_t size = H5Tget_size(type.get());
  if (size == 0 || size > kMaxTextBytes || size > impl_->file_size)
    fail(file, object, "attribute '" + name + "' size out of range");
  std::string value(size, '\0');
  check(H5Aread(attr.get(), type.get(), value.data()), file, object, "H5Aread");  // the file's type: see read_text
  value.resize(std::strlen(value.c_str()));
  return value;
}

int64_t H5Reader::int_attribute(const std::string& object, const std::string& name) const {
  const std::string& file = impl_->path;
  if (!exists(object)) fail(file, object, "missing attribute '" + name + "'");
  const auto [attr, type] = open_scalar_attribute(impl_->file.get(), file, object, name);
  if (H5Tget_class(type.get()) != H5T_INTEGER) fail(file, object, "attribute '" + name + "' is not a scalar integer");
  int64_t value = 0;
  check(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), file, object, "H5Aread");
  return value;
}

}  // namespace keel::checkpoint

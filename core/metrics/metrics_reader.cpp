// Why: see metrics_reader.h. Every read opens the file read-only (file locking off, like the writer) and
// closes it before returning; every HDF5 call is checked and a failure names the file and the dataset.
#include "core/metrics/metrics_reader.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <stdexcept>

#include "core/io/hdf5.h"
#include "core/metrics/hdf5_records.h"

namespace keel::metrics {

namespace {

using io::check;
using io::check_id;
using io::fail;
using io::Hid;

Hid open_read_only(const std::string& file) {
  Hid fapl = io::make_fapl(file);
  return Hid(check_id(H5Fopen(file.c_str(), H5F_ACC_RDONLY, fapl.get()), file, "/", "H5Fopen(read-only)"));
}

Hid open_dataset(hid_t file_id, const std::string& dataset, const std::string& file) {
  if (!io::link_exists(file_id, dataset, file)) {
    throw std::runtime_error("metrics: dataset '" + dataset + "' not found in " + file);
  }
  return Hid(check_id(H5Dopen2(file_id, dataset.c_str(), H5P_DEFAULT), file, dataset, "H5Dopen2"));
}

std::vector<hsize_t> dataset_shape(hid_t dset, const std::string& dataset, const std::string& file) {
  Hid space(check_id(H5Dget_space(dset), file, dataset, "H5Dget_space"));
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) fail(file, dataset, "H5Sget_simple_extent_ndims");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0)
    check(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), file, dataset, "H5Sget_simple_extent_dims");
  return dims;
}

std::string dtype_name(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return std::string(H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    case H5T_FLOAT:
      return "float" + std::to_string(bits);
    case H5T_STRING:
      return "string";
    case H5T_COMPOUND:
      return "compound";
    default:
      return "other";
  }
}

DatasetInfo dataset_info(hid_t dset, const std::string& dataset, const std::string& file) {
  DatasetInfo info;
  info.path = dataset;
  Hid type(check_id(H5Dget_type(dset), file, dataset, "H5Dget_type"));
  info.dtype = dtype_name(type.get());
  for (hsize_t d : dataset_shape(dset, dataset, file)) info.shape.push_back(static_cast<int64_t>(d));
  return info;
}

// Reads a whole dataset of the expected rank into `out` (resized here) as `mem_type`.
template <typename T>
void read_all(hid_t dset, hid_t mem_type, int expected_rank, std::vector<T>& out, std::vector<hsize_t>& dims,
              const std::string& dataset, const std::string& file) {
  dims = dataset_shape(dset, dataset, file);
  if (static_cast<int>(dims.size()) != expected_rank) {
    throw std::runtime_error("metrics: dataset '" + dataset + "' in " + file + " has rank " +
                             std::to_string(dims.size()) + ", expected " + std::to_string(expected_rank));
  }
  size_t count = 1;
  for (hsize_t d : dims) count *= static_cast<size_t>(d);
  out.resize(count);
  if (count == 0) return;
  check(H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), file, dataset, "H5Dread");
}

void require_class(hid_t dset, std::initializer_list<H5T_class_t> classes, const char* expected,
                   const std::string& dataset, const std::string& file) {
  Hid type(check_id(H5Dget_type(dset), file, dataset, "H5Dget_type"));
  const H5T_class_t cls = H5Tget_class(type.get());
  if (std::find(classes.begin(), classes.end(), cls) == classes.end()) {
    throw std::runtime_error("metrics: dataset '" + dataset + "' in " + file + " has dtype " + dtype_name(type.get()) +
                             ", expected " + expected);
  }
}

herr_t collect_attribute_name(hid_t, const char* name, const H5A_info_t*, void* op_data) {
  static_cast<std::vector<std::string>*>(op_data)->emplace_back(name);
  return 0;
}

}  // namespace

MetricsReader::MetricsReader(std::string path) : path_(std::move(path)) {
  std::error_code ec;
  if (!std::filesystem::exists(path_, ec)) throw std::runtime_error("metrics: file " + path_ + " does not exist");
  io::QuietHdf5Errors quiet;
  if (H5Fis_hdf5(path_.c_str()) <= 0) throw std::runtime_error("metrics: " + path_ + " is not an HDF5 file");
}

std::vector<double> MetricsReader::read_double(const std::string& dataset) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  require_class(dset.get(), {H5T_INTEGER, H5T_FLOAT}, "a number", dataset, path_);
  std::vector<double> out;
  std::vector<hsize_t> dims;
  read_all(dset.get(), H5T_NATIVE_DOUBLE, 1, out, dims, dataset, path_);
  return out;
}

std::vector<int64_t> MetricsReader::read_int64(const std::string& dataset) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  require_class(dset.get(), {H5T_INTEGER}, "an integer type", dataset, path_);
  std::vector<int64_t> out;
  std::vector<hsize_t> dims;
  read_all(dset.get(), H5T_NATIVE_INT64, 1, out, dims, dataset, path_);
  return out;
}

Matrix MetricsReader::read_matrix(const std::string& dataset) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  require_class(dset.get(), {H5T_INTEGER, H5T_FLOAT}, "a number", dataset, path_);
  Matrix m;
  std::vector<hsize_t> dims;
  read_all(dset.get(), H5T_NATIVE_FLOAT, 2, m.values, dims, dataset, path_);
  m.rows = static_cast<int64_t>(dims[0]);
  m.cols = static_cast<int64_t>(dims[1]);
  return m;
}

std::vector<Event> MetricsReader::read_events() const {
  const std::string dataset = "/events";
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  require_class(dset.get(), {H5T_COMPOUND}, "compound {step, kind, text}", dataset, path_);
  // HDF5 converts fixed-length strings of any size to ours (truncating), so files with other sizes read too.
  Hid mem_type = detail::make_event_type(/*in_file=*/false, path_);
  std::vector<detail::EventRecord> records;
  std::vector<hsize_t> dims;
  read_all(dset.get(), mem_type.get(), 1, records, dims, dataset, path_);
  std::vector<Event> events;
  events.reserve(records.size());
  for (const auto& r : records) {
    events.push_back({r.step, std::string(r.kind, strnlen(r.kind, sizeof(r.kind))),
                      std::string(r.text, strnlen(r.text, sizeof(r.text)))});
  }
  return events;
}

std::vector<BatchRow> MetricsReader::read_batch() const {
  const std::string dataset = "/data/batch";
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  if (!io::link_exists(file_id.get(), dataset, path_)) return {};
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  require_class(dset.get(), {H5T_COMPOUND}, "compound {step, slot, source, sample_id, ...}", dataset, path_);
  Hid mem_type = detail::make_batch_type(/*in_file=*/false, path_);
  std::vector<detail::BatchRecord> records;
  std::vector<hsize_t> dims;
  read_all(dset.get(), mem_type.get(), 1, records, dims, dataset, path_);
  std::vector<BatchRow> rows;
  rows.reserve(records.size());
  for (const auto& r : records) {
    rows.push_back(
        {r.step, r.slot, r.source, r.sample_id, r.epoch, r.chunk, r.first_doc, r.first_doc_offset, r.n_docs});
  }
  return rows;
}

std::vector<std::string> MetricsReader::batch_sources() const {
  return read_string_attribute("/data/batch", "sources");
}

std::map<int64_t, std::vector<BatchRow>> MetricsReader::read_batches_by_step() const {
  std::map<int64_t, std::vector<BatchRow>> out;
  const std::vector<BatchRow> rows = read_batch();
  for (size_t i = 0; i < rows.size(); ++i) {
    const bool new_block = i == 0 || rows[i].step != rows[i - 1].step || rows[i].slot <= rows[i - 1].slot;
    if (new_block) out[rows[i].step].clear();
    out[rows[i].step].push_back(rows[i]);
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> MetricsReader::read_config() const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  if (!io::link_exists(file_id.get(), "/config", path_)) {
    throw std::runtime_error("metrics: group '/config' not found in " + path_);
  }
  Hid group(check_id(H5Gopen2(file_id.get(), "/config", H5P_DEFAULT), path_, "/config", "H5Gopen2"));
  std::vector<std::string> names;
  hsize_t idx = 0;
  check(H5Aiterate2(group.get(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attribute_name, &names), path_, "/config",
        "H5Aiterate2");
  std::sort(names.begin(), names.end());
  std::vector<std::pair<std::string, std::string>> config;
  for (const auto& name : names) {
    const auto values = io::read_string_attribute(group.get(), name, path_, "/config");
    std::string joined;
    for (size_t i = 0; i < values.size(); ++i) joined += (i > 0 ? "," : "") + values[i];
    config.emplace_back(name, joined);
  }
  return config;
}

std::vector<std::string> MetricsReader::read_string_attribute(const std::string& object,
                                                              const std::string& name) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  if (object != "/" && !io::link_exists(file_id.get(), object, path_)) {
    throw std::runtime_error("metrics: object '" + object + "' not found in " + path_);
  }
  Hid obj(check_id(H5Oopen(file_id.get(), object.c_str(), H5P_DEFAULT), path_, object, "H5Oopen"));
  return io::read_string_attribute(obj.get(), name, path_, object);
}

bool MetricsReader::has_dataset(const std::string& dataset) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  if (!io::link_exists(file_id.get(), dataset, path_)) return false;
  Hid obj(H5Oopen(file_id.get(), dataset.c_str(), H5P_DEFAULT));
  return obj.valid() && H5Iget_type(obj.get()) == H5I_DATASET;
}

DatasetInfo MetricsReader::info(const std::string& dataset) const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  Hid dset = open_dataset(file_id.get(), dataset, path_);
  return dataset_info(dset.get(), dataset, path_);
}

std::vector<DatasetInfo> MetricsReader::list_datasets() const {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_read_only(path_);
  std::vector<DatasetInfo> result;
  // Depth-first over hard links by name; H5Gget_info/H5Lget_name_by_idx have the same signature in every
  // HDF5 since 1.8, unlike the visit/iterate callbacks.
  std::function<void(hid_t, const std::string&)> walk = [&](hid_t group, const std::string& prefix) {
    H5G_info_t ginfo;
    check(H5Gget_info(group, &ginfo), path_, prefix.empty() ? "/" : prefix, "H5Gget_info");
    for (hsize_t i = 0; i < ginfo.nlinks; ++i) {
      const ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
      if (len < 0) fail(path_, prefix, "H5Lget_name_by_idx");
      std::string name(static_cast<size_t>(len) + 1, '\0');
      if (H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT) < 0) {
        fail(path_, prefix, "H5Lget_name_by_idx");
      }
      name.resize(static_cast<size_t>(len));
      const std::string full = prefix + "/" + name;
      Hid obj(H5Oopen(group, name.c_str(), H5P_DEFAULT));
      if (!obj.valid()) continue;  // dangling soft/external link: not ours, skip
      const H5I_type_t type = H5Iget_type(obj.get());
      if (type == H5I_GROUP) {
        walk(obj.get(), full);
      } else if (type == H5I_DATASET) {
        result.push_back(dataset_info(obj.get(), full, path_));
      }
    }
  };
  Hid root(check_id(H5Gopen2(file_id.get(), "/", H5P_DEFAULT), path_, "/", "H5Gopen2"));
  walk(root.get(), "");
  std::sort(result.begin(), result.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
  return result;
}

}  // namespace keel::metrics

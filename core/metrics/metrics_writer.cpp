// Why: see metrics_writer.h. The one idea here is "open, append, close": the file is only open inside
// flush() (and the constructor), so a run killed at any other moment leaves a closed, consistent HDF5 file.
// Within a flush every table is written at a fixed offset taken from its "commit" column (/train/step for
// the step table, <name>_step for an extra series), and the commit column is written last, so a flush that
// fails half-way (or a later run that reopens a file a kill interrupted mid-flush) simply rewrites the same
// rows at the same place instead of misaligning columns. A kill inside a flush is the one risky moment; HDF5
// writes raw rows first and the superblock last when it closes, so such a kill can leave some columns one
// flush longer than others (OpenMode::kAppend trims them back), but never a file that refuses to open —
// provided the rows hold no pointers into HDF5's global heap, which is why /events uses fixed-length strings.
// DISABLED_SigkillStress in tests/unit/test_metrics_writer.cpp kills a writer mid-flush hundreds of times.
//
// A full disk is the other risky moment. HDF5 1.10 handles a failed write badly: a dataset or file whose
// close cannot write its last bytes stays half-open, its rows can be left as fill values under an extent that
// was already set, and at exit the library prints "infinite loop closing library". So a flush first reserves,
// outside HDF5, every byte it can add to the file (posix_fallocate past the end; HDF5 cuts the file back to
// what it used when it closes it), and HDF5's chunk cache is off for the datasets it writes, so that an I/O
// error surfaces in H5Dwrite rather than in a close. If the disk is full, the reservation fails before HDF5
// has touched the file. If HDF5 still fails, every dataset this flush extended is cut back to its old length
// before the file is closed, so the file never claims rows that hold fill values.
#include "core/metrics/metrics_writer.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <utility>

#include "core/io/hdf5.h"
#include "core/metrics/hdf5_records.h"
#include "keel/version.h"

namespace keel::metrics {

namespace {

using io::check;
using io::check_id;
using io::check_tri;
using io::fail;
using io::Hid;
// (dataset path, rows it had before this flush extended it)
using Extended = std::vector<std::pair<std::string, uint64_t>>;

constexpr hsize_t kChunkRows = 1024;  // 1-D series: 8 KiB chunks of int64/float64
constexpr hsize_t kEventChunkRows = 64;
constexpr hsize_t kBatchChunkRows = 512;  // /data/batch: 36 KiB chunks
constexpr const char* kBatchPath = "/data/batch";
constexpr const char* kSampleLossPath = "/data/sample_loss";   // float32, one row per /data/batch row
constexpr const char* kSourceLossPath = "/train/source_loss";  // float32 [steps, sources], a /train row table
constexpr const char* kStatsStepPath = "/stats/step";          // int64, the commit column of /stats
constexpr size_t kMatrixChunkFloats = 65536;                   // per-tensor matrices: chunks of <= 256 KiB
constexpr int kFormatVersion = 1;
// Room reserved for HDF5's own metadata in one flush (chunk-index nodes, object headers, a new series'
// links), on top of the new chunks: per flush, and per dataset written.
constexpr uint64_t kMetadataReserveBytes = 16 * 1024;
constexpr uint64_t kMetadataReservePerDataset = 2 * 1024;

// An operating-system call failed; what() is the OS's message ("No space left on device").
class OsFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The commit column of the step table: written last in every flush.
constexpr const char* kStepPath = "/train/step";

Hid create_group(hid_t loc, const std::string& path, const std::string& file) {
  return Hid(check_id(H5Gcreate2(loc, path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), file, path, "H5Gcreate2"));
}

Hid open_group(hid_t loc, const std::string& path, const std::string& file) {
  return Hid(check_id(H5Gopen2(loc, path.c_str(), H5P_DEFAULT), file, path, "H5Gopen2"));
}

// Creates an empty, chunked dataset with an unlimited first dimension: 1-D when cols == 0, else [0, cols].
void create_extendible(hid_t loc, const std::string& path, hid_t file_type, hsize_t cols, hsize_t chunk_rows,
                       bool nan_fill, const std::string& file) {
  const int rank = cols == 0 ? 1 : 2;
  const hsize_t dims[2] = {0, cols};
  const hsize_t max_dims[2] = {H5S_UNLIMITED, cols};
  const hsize_t chunk[2] = {chunk_rows, cols};
  Hid space(check_id(H5Screate_simple(rank, dims, max_dims), file, path, "H5Screate_simple"));
  Hid dcpl(check_id(H5Pcreate(H5P_DATASET_CREATE), file, path, "H5Pcreate(dataset create)"));
  check(H5Pset_chunk(dcpl.get(), rank, chunk), file, path, "H5Pset_chunk");
  if (nan_fill) {
    // Rows are always written right after being added; NaN (not 0) is what a reader would see otherwise.
    if (H5Tget_size(file_type) == sizeof(float)) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      check(H5Pset_fill_value(dcpl.get(), H5T_NATIVE_FLOAT, &nan), file, path, "H5Pset_fill_value");
    } else {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      check(H5Pset_fill_value(dcpl.get(), H5T_NATIVE_DOUBLE, &nan), file, path, "H5Pset_fill_value");
    }
  }
  Hid dset(check_id(H5Dcreate2(loc, path.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), file,
                    path, "H5Dcreate2"));
}

hsize_t matrix_chunk_rows(size_t cols) {
  return std::clamp<hsize_t>(kMatrixChunkFloats / std::max<size_t>(cols, 1), 1, kChunkRows);
}

// Rows and columns of an existing 1-D or 2-D dataset (columns 1 for a 1-D dataset).
std::pair<hsize_t, size_t> dataset_shape(hid_t file_id, const std::string& path, const std::string& file) {
  Hid dset(check_id(H5Dopen2(file_id, path.c_str(), H5P_DEFAULT), file, path, "H5Dopen2"));
  Hid space(check_id(H5Dget_space(dset.get()), file, path, "H5Dget_space"));
  hsize_t dims[2] = {0, 1};
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 1 || rank > 2) fail(file, path, "checking rank (expected 1-D or 2-D)");
  check(H5Sget_simple_extent_dims(space.get(), dims, nullptr), file, path, "H5Sget_simple_extent_dims");
  return {dims[0], rank == 1 ? 1 : static_cast<size_t>(dims[1])};
}

hsize_t dataset_rows(hid_t file_id, const std::string& path, const std::string& file) {
  return dataset_shape(file_id, path, file).first;
}

// Sets the dataset's row count to `base + n` and writes `n` rows from `data` at row `base`, recording the
// extension in `extended` first (flush() cuts it back if anything fails). cols == 0 for 1-D datasets. The
// dataset is opened without a chunk cache, so its chunks are written inside H5Dwrite (an I/O error surfaces
// there) and its close has nothing left to write.
void write_rows(hid_t file_id, const std::string& path, hid_t mem_type, const void* data, hsize_t base, hsize_t n,
                hsize_t cols, const std::string& file, Extended& extended) {
  Hid dapl(check_id(H5Pcreate(H5P_DATASET_ACCESS), file, path, "H5Pcreate(dataset access)"));
  check(H5Pset_chunk_cache(dapl.get(), 0, 0, H5D_CHUNK_CACHE_W0_DEFAULT), file, path, "H5Pset_chunk_cache");
  Hid dset(check_id(H5Dopen2(file_id, path.c_str(), dapl.get()), file, path, "H5Dopen2"));
  const int rank = cols == 0 ? 1 : 2;
  const hsize_t new_dims[2] = {base + n, cols};
  if (n == 0) return;
  extended.emplace_back(path, base);
  check(H5Dset_extent(dset.get(), new_dims), file, path, "H5Dset_extent");
  Hid file_space(check_id(H5Dget_space(dset.get()), file, path, "H5Dget_space"));
  const hsize_t start[2] = {base, 0};
  const hsize_t count[2] = {n, cols};
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr), file, path,
        "H5Sselect_hyperslab");
  Hid mem_space(check_id(H5Screate_simple(rank, count, nullptr), file, path, "H5Screate_simple"));
  check(H5Dwrite(dset.get(), mem_type, mem_space.get(), file_space.get(), H5P_DEFAULT, data), file, path, "H5Dwrite");
  if (!dset.reset()) fail(file, path, "H5Dclose");
}

// Every dataset of group /stats (its series and /stats/step).
std::vector<std::string> stats_datasets(hid_t file_id, const std::string& file) {
  std::vector<std::string> names;
  Hid group = open_group(file_id, "/stats", file);
  const H5L_iterate_t collect = [](hid_t, const char* name, const H5L_info_t*, void* out) -> herr_t {
    static_cast<std::vector<std::string>*>(out)->push_back(std::string("/stats/") + name);
    return 0;
  };
  check(H5Literate(group.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &names), file, "/stats", "H5Literate");
  return names;
}

// Truncates every dataset in `paths` to `rows` rows if it has more.
void truncate_rows(hid_t file_id, const std::vector<std::string>& paths, hsize_t rows, const std::string& file) {
  for (const auto& path : paths) {
    Hid dset(check_id(H5Dopen2(file_id, path.c_str(), H5P_DEFAULT), file, path, "H5Dopen2"));
    Hid space(check_id(H5Dget_space(dset.get()), file, path, "H5Dget_space"));
    hsize_t dims[2] = {0, 0};
    check(H5Sget_simple_extent_dims(space.get(), dims, nullptr), file, path, "H5Sget_simple_extent_dims");
    if (dims[0] > rows) {
      dims[0] = rows;
      check(H5Dset_extent(dset.get(), dims), file, path, "H5Dset_extent(truncate)");
    }
  }
}

// After a failed flush: every dataset the flush extended goes back to the rows it had. Best effort (the
// failure is already being reported); errors here are dropped.
void cut_back(hid_t file_id, const Extended& extended, const std::string& file) {
  for (auto it = extended.rbegin(); it != extended.rend(); ++it) {
    try {
      truncate_rows(file_id, {it->first}, it->second, file);
    } catch (const std::exception&) {
    }
  }
}

// Bytes of the chunks (of `chunk_rows` rows of `row_bytes` each) that rows [base, base + n) need and that do
// not exist yet: a chunk exists once a row below `base` lies in it.
uint64_t new_chunk_bytes(uint64_t base, uint64_t n, uint64_t chunk_rows, uint64_t row_bytes) {
  if (n == 0) return 0;
  const uint64_t first_new = (base + chunk_rows - 1) / chunk_rows;
  const uint64_t last = (base + n - 1) / chunk_rows;
  return last >= first_new ? (last - first_new + 1) * chunk_rows * row_bytes : 0;
}

// Allocates `bytes` more disk blocks past the end of `path` (the file grows; HDF5 truncates it to what it
// used when it closes it), so that HDF5's writes in the coming flush land in blocks the disk has already
// given. Throws OsFailure when the disk has no room, leaving the file as it was. A file system that cannot
// preallocate gets no reservation.
void reserve_space(const std::string& path, uint64_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) throw OsFailure(std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int saved = errno;
    ::close(fd);
    throw OsFailure(std::strerror(saved));
  }
  const int rc = ::posix_fallocate(fd, st.st_size, static_cast<off_t>(bytes));
  if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL && rc != ENOSYS && rc != ENODEV) {
    if (::ftruncate(fd, st.st_size) != 0) {
      // The file keeps some zero bytes past HDF5's end of file; every reader ignores them.
    }
    ::close(fd);
    throw OsFailure(std::strerror(rc));
  }
  if (::close(fd) != 0) throw OsFailure(std::strerror(errno));
}

struct TrainColumn {
  const char* path;
  hid_t file_type;
  bool nan_fill;
};

// All 1-D columns of /train except /train/step (the commit column, written last).
std::vector<TrainColumn> train_columns() {
  return {
      {"/train/loss", H5T_IEEE_F64LE, true},         {"/train/grad_norm", H5T_IEEE_F64LE, true},
      {"/train/lr", H5T_IEEE_F64LE, true},           {"/train/tokens", H5T_STD_I64LE, false},
      {"/train/tokens_per_s", H5T_IEEE_F64LE, true}, {"/train/step_time_s", H5T_IEEE_F64LE, true},
      {"/train/skipped", H5T_STD_U8LE, false},
  };
}

constexpr const char* kTensorGradPath = "/train/tensor/grad_norm";
constexpr const char* kTensorParamPath = "/train/tensor/param_norm";

void validate_extra_name(const std::string& name) {
  const std::string suffix = "_step";
  const bool ends_with_step =
      name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos || ends_with_step) {
    throw std::invalid_argument("metrics: invalid scalar name '" + name +
                                "' (must be non-empty, contain no '/', not be '.'/'..', not end in '_step')");
  }
}

Hid open_file_rw(const std::string& file) {
  Hid fapl = io::make_fapl(file);
  return Hid(check_id(H5Fopen(file.c_str(), H5F_ACC_RDWR, fapl.get()), file, "/", "H5Fopen(read-write)"));
}

void close_file(Hid& file_id, const std::string& file) {
  if (!file_id.reset()) fail(file, "/", "H5Fclose");
}

}  // namespace

MetricsWriter::MetricsWriter(std::string path, OpenMode mode,
                             std::vector<std::pair<std::string, std::string>> config_attributes,
                             std::vector<std::string> tensor_names, int64_t flush_every)
    : path_(std::move(path)), tensor_names_(std::move(tensor_names)), flush_every_(flush_every) {
  if (flush_every_ < 1) {
    throw std::invalid_argument("metrics: flush_every must be >= 1 (got " + std::to_string(flush_every_) + ") for " +
                                path_);
  }
  for (const auto& [key, value] : config_attributes) {
    if (key.empty() || key.find('/') != std::string::npos) {
      throw std::invalid_argument("metrics: invalid config attribute name '" + key + "' for " + path_);
    }
  }
  io::QuietHdf5Errors quiet;
  if (mode == OpenMode::kCreate) {
    std::error_code ec;
    if (std::filesystem::exists(path_, ec)) {
      throw std::runtime_error("metrics: " + path_ +
                               " already exists (open it with OpenMode::kAppend to continue "
                               "a run, or choose a new run directory)");
    }
    bool created = false;
    try {
      create_file(config_attributes, created);
    } catch (const io::Hdf5Error& e) {
      if (created) std::filesystem::remove(path_, ec);  // no half-made file blocking the next kCreate
      if (e.os_error().empty()) throw;
      throw MetricsWriteError("metrics: cannot create " + path_ + ": " + e.os_error());
    } catch (...) {
      if (created) std::filesystem::remove(path_, ec);
      throw;
    }
  } else {
    open_existing(config_attributes);
  }
}

MetricsWriter::~MetricsWriter() {
  if (failed_) return;  // reported once already, by the MetricsWriteError that flush() threw
  try {
    flush();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
  } catch (...) {
    spdlog::error("metrics: unknown error while flushing {}", path_);
  }
}

void MetricsWriter::create_file(const std::vector<std::pair<std::string, std::string>>& config_attributes,
                                bool& created) {
  Hid fapl = io::make_fapl(path_);
  Hid file_id(check_id(H5Fcreate(path_.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), path_, "/", "H5Fcreate"));
  created = true;
  const hid_t f = file_id.get();

  {
    Hid root = open_group(f, "/", path_);
    io::write_string_attribute(root.get(), "keel_version", KEEL_VERSION, path_, "/");
    io::write_string_attribute(root.get(), "created_utc", io::utc_now_iso8601(), path_, "/");
    Hid space(check_id(H5Screate(H5S_SCALAR), path_, "/", "H5Screate(scalar)"));
    Hid attr(check_id(H5Acreate2(root.get(), "format_version", H5T_STD_I32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                      path_, "/ attribute format_version", "H5Acreate2"));
    check(H5Awrite(attr.get(), H5T_NATIVE_INT, &kFormatVersion), path_, "/ attribute format_version", "H5Awrite");
  }
  {
    Hid config = create_group(f, "/config", path_);
    for (const auto& [key, value] : config_attributes) {
      io::write_string_attribute(config.get(), key, value, path_, "/config");
    }
  }
  create_group(f, "/train", path_);
  create_extendible(f, kStepPath, H5T_STD_I64LE, 0, kChunkRows, false, path_);
  for (const auto& column : train_columns()) {
    create_extendible(f, column.path, column.file_type, 0, kChunkRows, column.nan_fill, path_);
  }
  create_group(f, "/train/extra", path_);
  if (!tensor_names_.empty()) {
    create_group(f, "/train/tensor", path_);
    const hsize_t cols = tensor_names_.size();
    for (const char* matrix : {kTensorGradPath, kTensorParamPath}) {
      create_extendible(f, matrix, H5T_IEEE_F32LE, cols, matrix_chunk_rows(cols), true, path_);
      Hid dset(check_id(H5Dopen2(f, matrix, H5P_DEFAULT), path_, matrix, "H5Dopen2"));
      io::write_string_array_attribute(dset.get(), "names", tensor_names_, path_, matrix);
    }
  }
  {
    Hid event_type = detail::make_event_type(/*in_file=*/true, path_);
    create_extendible(f, "/events", event_type.get(), 0, kEventChunkRows, false, path_);
  }
  close_file(file_id, path_);
}

void MetricsWriter::open_existing(const std::vector<std::pair<std::string, std::string>>& config_attributes) {
  std::error_code ec;
  if (!std::filesystem::exists(path_, ec)) {
    throw std::runtime_error("metrics: " + path_ +
                             " does not exist (OpenMode::kAppend continues an existing "
                             "metrics file; use OpenMode::kCreate for a new run)");
  }
  if (H5Fis_hdf5(path_.c_str()) <= 0) {
    throw std::runtime_error("metrics: " + path_ + " is not an HDF5 file");
  }
  Hid file_id = open_file_rw(path_);
  const hid_t f = file_id.get();

  std::vector<std::string> row_datasets = {kStepPath};
  for (const auto& column : train_columns()) row_datasets.emplace_back(column.path);
  for (const auto& dataset : row_datasets) {
    if (!io::link_exists(f, dataset, path_)) {
      throw std::runtime_error("metrics: dataset '" + dataset + "' missing in " + path_ +
                               " (not a Keel metrics file, or damaged)");
    }
  }
  if (!io::link_exists(f, "/events", path_)) {
    throw std::runtime_error("metrics: dataset '/events' missing in " + path_);
  }
  if (!io::link_exists(f, "/train/extra", path_)) create_group(f, "/train/extra", path_);
  if (!io::link_exists(f, "/config", path_)) create_group(f, "/config", path_);

  // Per-tensor matrices: the stored column names must be the ones this run uses.
  const bool has_tensor = io::link_exists(f, kTensorGradPath, path_);
  if (has_tensor) {
    for (const char* matrix : {kTensorGradPath, kTensorParamPath}) {
      Hid dset(check_id(H5Dopen2(f, matrix, H5P_DEFAULT), path_, matrix, "H5Dopen2"));
      const auto stored = io::read_string_attribute(dset.get(), "names", path_, matrix);
      if (stored != tensor_names_) {
        throw std::runtime_error("metrics: tensor names of this run (" + std::to_string(tensor_names_.size()) +
                                 " tensors) differ from the " + std::to_string(stored.size()) + " names stored in '" +
                                 matrix + "' of " + path_ + "; cannot append per-tensor norms to it");
      }
      row_datasets.emplace_back(matrix);
    }
  } else if (!tensor_names_.empty()) {
    throw std::runtime_error("metrics: " + path_ + " has no '" + std::string(kTensorGradPath) + "' but this run has " +
                             std::to_string(tensor_names_.size()) + " tensor names; cannot append per-tensor norms");
  }

  if (io::link_exists(f, kSourceLossPath, path_)) row_datasets.emplace_back(kSourceLossPath);

  // A kill in the middle of a flush can leave some columns longer than others: cut all back to the shortest.
  hsize_t min_rows = std::numeric_limits<hsize_t>::max();
  hsize_t max_rows = 0;
  for (const auto& dataset : row_datasets) {
    const hsize_t rows = dataset_rows(f, dataset, path_);
    min_rows = std::min(min_rows, rows);
    max_rows = std::max(max_rows, rows);
  }
  if (min_rows != max_rows) {
    truncate_rows(f, row_datasets, min_rows, path_);
    events_.push_back({-1, "metrics_repaired",
                       "step table columns had " + std::to_string(min_rows) + ".." + std::to_string(max_rows) +
                           " rows after an interrupted flush; truncated to " + std::to_string(min_rows)});
  }
  rows_in_file_ = static_cast<int64_t>(min_rows);
  events_in_file_ = static_cast<int64_t>(dataset_rows(f, "/events", path_));
  if (io::link_exists(f, kStatsStepPath, path_)) {  // /stats: every series cut back to the rows /stats/step commits
    stats_rows_in_file_ = static_cast<int64_t>(dataset_rows(f, kStatsStepPath, path_));
    truncate_rows(f, stats_datasets(f, path_), static_cast<hsize_t>(stats_rows_in_file_), path_);
  }

  // Config: keep what the file says; add new keys; record changed values as events.
  {
    Hid config = open_group(f, "/config", path_);
    for (const auto& [key, value] : config_attributes) {
      if (check_tri(H5Aexists(config.get(), key.c_str()), path_, "/config attribute " + key, "H5Aexists") > 0) {
        const auto old = io::read_string_attribute(config.get(), key, path_, "/config");
        const std::string old_value = old.empty() ? "" : old.front();
        if (old_value != value) {
          events_.push_back({-1, "config_changed", key + ": '" + old_value + "' -> '" + value + "'"});
        }
      } else {
        io::write_string_attribute(config.get(), key, value, path_, "/config");
      }
    }
  }
  close_file(file_id, path_);
}

void MetricsWriter::append(const StepRow& row) {
  const size_t n = tensor_names_.size();
  for (const auto* norms : {&row.tensor_grad_norms, &row.tensor_param_norms}) {
    if (!norms->empty() && norms->size() != n) {
      throw std::invalid_argument("metrics: step " + std::to_string(row.step) + " has " +
                                  std::to_string(norms->size()) + " per-tensor norms but " + path_ + " has " +
                                  std::to_string(n) + " tensor columns");
    }
  }
  if (!row.batch.empty() && batch_sources_.empty()) {
    throw std::invalid_argument("metrics: step " + std::to_string(row.step) + " has batch samples but " + path_ +
                                " has no source names (call set_batch_sources first)");
  }
  if (!row.source_loss.empty() && row.source_loss.size() != batch_sources_.size()) {
    throw std::invalid_argument("metrics: step " + std::to_string(row.step) + " has " +
                                std::to_string(row.source_loss.size()) + " per-source losses but " + path_ + " has " +
                                std::to_string(batch_sources_.size()) + " sources");
  }
  steps_.push_back(row.step);
  source_loss_.push_back(row.source_loss);
  loss_.push_back(row.loss);
  grad_norm_.push_back(row.grad_norm);
  lr_.push_back(row.lr);
  tokens_.push_back(row.tokens);
  tokens_per_s_.push_back(row.tokens_per_s);
  step_time_s_.push_back(row.step_time_s);
  skipped_.push_back(row.skipped ? 1 : 0);
  for (const auto& sample : row.batch) {
    batch_.push_back(sample);
    batch_steps_.push_back(row.step);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (row.tensor_grad_norms.empty()) {
    tensor_grad_norms_.insert(tensor_grad_norms_.end(), n, nan);
  } else {
    tensor_grad_norms_.insert(tensor_grad_norms_.end(), row.tensor_grad_norms.begin(), row.tensor_grad_norms.end());
  }
  if (row.tensor_param_norms.empty()) {
    tensor_param_norms_.insert(tensor_param_norms_.end(), n, nan);
  } else {
    tensor_param_norms_.insert(tensor_param_norms_.end(), row.tensor_param_norms.begin(), row.tensor_param_norms.end());
  }
  if (static_cast<int64_t>(steps_.size()) >= flush_every_) flush();
}

void MetricsWriter::stats(int64_t step, std::vector<std::pair<std::string, std::vector<float>>> series) {
  for (const auto& [name, values] : series) {
    if (name.empty() || name.find('/') != std::string::npos || name == "step" || values.empty())
      throw std::invalid_argument("metrics: bad /stats series '" + name + "' at step " + std::to_string(step) +
                                  " (a non-empty name without '/', not 'step', with at least one value)");
    for (const auto& row : stats_rows_) {
      for (const auto& [other, other_values] : row) {
        if (other == name && other_values.size() != values.size())
          throw std::invalid_argument("metrics: /stats/" + name + " has " + std::to_string(values.size()) +
                                      " values at step " + std::to_string(step) + " but " +
                                      std::to_string(other_values.size()) + " in an earlier row of " + path_);
      }
    }
  }
  stats_steps_.push_back(step);
  stats_rows_.push_back(std::move(series));
}

void MetricsWriter::set_batch_sources(std::vector<std::string> names) {
  io::QuietHdf5Errors quiet;
  Hid file_id = open_file_rw(path_);
  if (io::link_exists(file_id.get(), kBatchPath, path_)) {
    Hid dset(check_id(H5Dopen2(file_id.get(), kBatchPath, H5P_DEFAULT), path_, kBatchPath, "H5Dopen2"));
    const auto stored = io::read_string_attribute(dset.get(), "sources", path_, kBatchPath);
    if (stored != names) {
      std::string have, want;
      for (const auto& n : stored) have += (have.empty() ? "" : ",") + n;
      for (const auto& n : names) want += (want.empty() ? "" : ",") + n;
      throw std::runtime_error("metrics: " + path_ + ": /data/batch records sources [" + have + "] but this run has [" +
                               want + "]; cannot append its batches");
    }
    batch_rows_in_file_ = static_cast<int64_t>(dataset_rows(file_id.get(), kBatchPath, path_));
  }
  if (io::link_exists(file_id.get(), kSourceLossPath, path_)) {
    Hid dset(check_id(H5Dopen2(file_id.get(), kSourceLossPath, H5P_DEFAULT), path_, kSourceLossPath, "H5Dopen2"));
    if (io::read_string_attribute(dset.get(), "names", path_, kSourceLossPath) != names) {
      throw std::runtime_error("metrics: " + path_ + ": /train/source_loss has other source columns than this run's " +
                               std::to_string(names.size()) + " sources; cannot append to it");
    }
  }
  close_file(file_id, path_);
  batch_sources_ = std::move(names);
}

void MetricsWriter::event(int64_t step, const std::string& kind, const std::string& text) {
  events_.push_back({step, kind, text});
}

void MetricsWriter::scalar(int64_t step, const std::string& name, double value) {
  validate_extra_name(name);
  auto it = std::find_if(extras_.begin(), extras_.end(), [&](const auto& e) { return e.first == name; });
  if (it == extras_.end()) {
    extras_.emplace_back(name, std::vector<ExtraPoint>{});
    it = std::prev(extras_.end());
  }
  it->second.push_back({step, value});
}

void MetricsWriter::clear_train_buffer() {
  steps_.clear();
  loss_.clear();
  grad_norm_.clear();
  lr_.clear();
  tokens_.clear();
  tokens_per_s_.clear();
  step_time_s_.clear();
  skipped_.clear();
  tensor_grad_norms_.clear();
  tensor_param_norms_.clear();
  source_loss_.clear();
  batch_.clear();
  batch_steps_.clear();
}

uint64_t MetricsWriter::flush_bound_bytes() const {
  uint64_t bytes = kMetadataReserveBytes;
  uint64_t datasets = 0;
  if (!steps_.empty()) {
    const uint64_t base = static_cast<uint64_t>(rows_in_file_);
    const uint64_t n = steps_.size();
    bytes += new_chunk_bytes(base, n, kChunkRows, sizeof(int64_t));  // /train/step
    for (const auto& column : train_columns()) {
      bytes += new_chunk_bytes(base, n, kChunkRows, H5Tget_size(column.file_type));
    }
    datasets += 1 + train_columns().size();
    if (!tensor_names_.empty()) {
      const uint64_t cols = tensor_names_.size();
      bytes += 2 * new_chunk_bytes(base, n, matrix_chunk_rows(cols), cols * sizeof(float));
      datasets += 2;
    }
    if (!batch_sources_.empty()) {  // /train/source_loss
      const uint64_t cols = batch_sources_.size();
      bytes += new_chunk_bytes(base, n, matrix_chunk_rows(cols), cols * sizeof(float));
      datasets += 1;
    }
  }
  if (!batch_.empty()) {
    bytes += new_chunk_bytes(static_cast<uint64_t>(batch_rows_in_file_), batch_.size(), kBatchChunkRows,
                             sizeof(detail::BatchRecord));
    bytes += new_chunk_bytes(static_cast<uint64_t>(batch_rows_in_file_), batch_.size(), kBatchChunkRows, sizeof(float));
    datasets += 2;
  }
  if (!events_.empty()) {
    bytes += new_chunk_bytes(static_cast<uint64_t>(events_in_file_), events_.size(), kEventChunkRows,
                             sizeof(detail::EventRecord));
    datasets += 1;
  }
  for (const auto& row : stats_rows_) {  // /stats: a bound per row and series (rows are few: stats steps only)
    for (const auto& [name, values] : row) bytes += 2 * std::max<uint64_t>(values.size() * sizeof(float), 8 * 1024);
    bytes += 2 * kChunkRows * sizeof(int64_t);
    datasets += row.size() + 1;
  }
  for (const auto& [name, points] : extras_) {
    // Rows already in the file are not tracked per series: count every chunk the new points can touch.
    const uint64_t chunks = (points.size() + kChunkRows - 1) / kChunkRows + 1;
    bytes += 2 * chunks * kChunkRows * sizeof(double);
    datasets += 2;
  }
  return bytes + datasets * kMetadataReservePerDataset;
}

void MetricsWriter::flush() {
  if (steps_.empty() && events_.empty() && extras_.empty() && stats_steps_.empty()) return;
  io::QuietHdf5Errors quiet;
  const int64_t first_row = rows_in_file_;
  const int64_t rows = static_cast<int64_t>(steps_.size());
  const size_t events = events_.size();
  std::string reason;
  try {
    reserve_space(path_, flush_bound_bytes());
    Hid file_id = open_file_rw(path_);
    Extended extended;
    try {
      write_buffered(file_id.get(), extended);
    } catch (...) {
      cut_back(file_id.get(), extended, path_);
      file_id.reset();
      throw;
    }
    close_file(file_id, path_);
    failed_ = false;
    return;
  } catch (const OsFailure& e) {
    reason = e.what();
  } catch (const io::Hdf5Error& e) {
    reason = e.reason();
  } catch (const std::exception& e) {
    reason = io::one_line(e.what());
  }
  failed_ = true;
  // What the file lacks: the rows that were buffered (when this flush wrote them, the failure came after and
  // cut them back), else the buffered events and scalars.
  std::string lost;
  if (rows > 0) {
    lost = rows == 1 ? "row " + std::to_string(first_row)
                     : "rows " + std::to_string(first_row) + "-" + std::to_string(first_row + rows - 1);
  } else if (events > 0) {
    lost = std::to_string(events) + (events == 1 ? " event" : " events");
  } else {
    lost = "buffered scalars";
  }
  throw MetricsWriteError("metrics: cannot write " + path_ + ": " + reason + " (" + lost + " not written)");
}

void MetricsWriter::write_buffered(int64_t file_id, Extended& extended) {
  const hid_t f = file_id;
  // Everything is written first and dropped from the buffers only once the file is written: a failure
  // anywhere leaves all buffers as they were, and the file is cut back to the same rows.
  const hsize_t base = dataset_rows(f, kStepPath, path_);
  const hsize_t n = steps_.size();
  if (n > 0) {
    // Step table: every column is written at base = rows of /train/step; /train/step itself last.
    write_rows(f, "/train/loss", H5T_NATIVE_DOUBLE, loss_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/grad_norm", H5T_NATIVE_DOUBLE, grad_norm_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/lr", H5T_NATIVE_DOUBLE, lr_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/tokens", H5T_NATIVE_INT64, tokens_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/tokens_per_s", H5T_NATIVE_DOUBLE, tokens_per_s_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/step_time_s", H5T_NATIVE_DOUBLE, step_time_s_.data(), base, n, 0, path_, extended);
    write_rows(f, "/train/skipped", H5T_NATIVE_UINT8, skipped_.data(), base, n, 0, path_, extended);
    if (!tensor_names_.empty()) {
      const hsize_t cols = tensor_names_.size();
      write_rows(f, kTensorGradPath, H5T_NATIVE_FLOAT, tensor_grad_norms_.data(), base, n, cols, path_, extended);
      write_rows(f, kTensorParamPath, H5T_NATIVE_FLOAT, tensor_param_norms_.data(), base, n, cols, path_, extended);
    }
    write_source_loss(f, base, extended);
    // The step's samples are in the file before its /train/step row.
    write_batch(f, extended);
    // The other columns' new lengths reach the file before /train/step's: HDF5 writes its cached metadata in
    // no particular order when the file closes, so without this a kill inside the close could leave
    // /train/step longer than a column.
    check(H5Fflush(f, H5F_SCOPE_LOCAL), path_, "/", "H5Fflush");
    write_rows(f, kStepPath, H5T_NATIVE_INT64, steps_.data(), base, n, 0, path_, extended);
  }

  const hsize_t event_base = dataset_rows(f, "/events", path_);
  if (!events_.empty()) {
    std::vector<detail::EventRecord> records(events_.size());
    for (size_t i = 0; i < events_.size(); ++i) {
      records[i].step = events_[i].step;
      detail::copy_truncated(events_[i].kind, records[i].kind, sizeof(records[i].kind));
      detail::copy_truncated(events_[i].text, records[i].text, sizeof(records[i].text));
    }
    Hid mem_type = detail::make_event_type(/*in_file=*/false, path_);
    write_rows(f, "/events", mem_type.get(), records.data(), event_base, records.size(), 0, path_, extended);
  }

  // Extra series: every value column first, then (after a metadata flush, as for /train/step) every
  // <name>_step commit column.
  std::vector<hsize_t> extra_bases;
  for (const auto& [name, points] : extras_) {
    const std::string value_path = "/train/extra/" + name;
    const std::string step_path = value_path + "_step";
    if (!io::link_exists(f, value_path, path_)) {
      create_extendible(f, value_path, H5T_IEEE_F64LE, 0, kChunkRows, true, path_);
    }
    if (!io::link_exists(f, step_path, path_)) {
      create_extendible(f, step_path, H5T_STD_I64LE, 0, kChunkRows, false, path_);
    }
    extra_bases.push_back(dataset_rows(f, step_path, path_));
    std::vector<double> values;
    values.reserve(points.size());
    for (const auto& p : points) values.push_back(p.value);
    write_rows(f, value_path, H5T_NATIVE_DOUBLE, values.data(), extra_bases.back(), values.size(), 0, path_, extended);
  }
  if (!extras_.empty()) check(H5Fflush(f, H5F_SCOPE_LOCAL), path_, "/", "H5Fflush");
  for (size_t i = 0; i < extras_.size(); ++i) {
    const auto& [name, points] = extras_[i];
    std::vector<int64_t> steps;
    steps.reserve(points.size());
    for (const auto& p : points) steps.push_back(p.step);
    write_rows(f, "/train/extra/" + name + "_step", H5T_NATIVE_INT64, steps.data(), extra_bases[i], steps.size(), 0,
               path_, extended);
  }

  write_stats(f, extended);

  // Written: now the buffers can go.
  batch_rows_in_file_ += static_cast<int64_t>(batch_.size());
  rows_in_file_ = static_cast<int64_t>(base + n);
  events_in_file_ = static_cast<int64_t>(event_base + events_.size());
  clear_train_buffer();
  events_.clear();
  extras_.clear();
  stats_rows_in_file_ += static_cast<int64_t>(stats_steps_.size());
  stats_steps_.clear();
  stats_rows_.clear();
}

void MetricsWriter::write_stats(int64_t file_id, Extended& extended) {
  if (stats_steps_.empty()) return;
  const hid_t f = file_id;
  if (!io::link_exists(f, "/stats", path_)) create_group(f, "/stats", path_);
  if (!io::link_exists(f, kStatsStepPath, path_))
    create_extendible(f, kStatsStepPath, H5T_STD_I64LE, 0, kChunkRows, false, path_);
  const hsize_t base = dataset_rows(f, kStatsStepPath, path_);
  const hsize_t n = stats_steps_.size();
  std::vector<std::pair<std::string, size_t>> columns;  // every series of the buffered rows, first-seen order
  for (const auto& row : stats_rows_) {
    for (const auto& [name, values] : row) {
      const bool seen = std::any_of(columns.begin(), columns.end(), [&](const auto& c) { return c.first == name; });
      if (!seen) columns.emplace_back(name, values.size());
    }
  }
  for (const std::string& path : stats_datasets(f, path_)) {  // a series of earlier rows missing now: NaN rows
    const std::string name = path.substr(std::string("/stats/").size());
    const bool buffered = std::any_of(columns.begin(), columns.end(), [&](const auto& c) { return c.first == name; });
    if (path != kStatsStepPath && !buffered) columns.emplace_back(name, dataset_shape(f, path, path_).second);
  }
  for (const auto& [name, cols] : columns) {
    const std::string path = "/stats/" + name;
    const hsize_t file_cols = cols == 1 ? 0 : cols;
    if (!io::link_exists(f, path, path_))
      create_extendible(f, path, H5T_IEEE_F32LE, file_cols, cols == 1 ? kChunkRows : matrix_chunk_rows(cols), true,
                        path_);
    std::vector<float> values(n * cols, std::numeric_limits<float>::quiet_NaN());  // [n, cols]
    for (size_t r = 0; r < n; ++r) {
      for (const auto& [other, row_values] : stats_rows_[r])
        if (other == name) std::copy(row_values.begin(), row_values.end(), values.begin() + r * cols);
    }
    write_rows(f, path, H5T_NATIVE_FLOAT, values.data(), base, n, file_cols, path_, extended);
  }
  check(H5Fflush(f, H5F_SCOPE_LOCAL), path_, "/", "H5Fflush");  // the series' lengths before /stats/step's
  write_rows(f, kStatsStepPath, H5T_NATIVE_INT64, stats_steps_.data(), base, n, 0, path_, extended);
}

void MetricsWriter::write_batch(int64_t file_id, Extended& extended) {
  if (batch_.empty()) return;
  const hid_t f = file_id;
  if (!io::link_exists(f, kBatchPath, path_)) {
    if (!io::link_exists(f, "/data", path_)) create_group(f, "/data", path_);
    Hid file_type = detail::make_batch_type(/*in_file=*/true, path_);
    create_extendible(f, kBatchPath, file_type.get(), 0, kBatchChunkRows, false, path_);
    Hid dset(check_id(H5Dopen2(f, kBatchPath, H5P_DEFAULT), path_, kBatchPath, "H5Dopen2"));
    io::write_string_array_attribute(dset.get(), "sources", batch_sources_, path_, kBatchPath);
  }
  std::vector<detail::BatchRecord> records(batch_.size());
  for (size_t i = 0; i < batch_.size(); ++i) {
    const BatchSample& b = batch_[i];
    records[i] = {batch_steps_[i], b.slot,      b.source,           b.sample_id, b.epoch,
                  b.chunk,         b.first_doc, b.first_doc_offset, b.n_docs};
  }
  // /data/sample_loss row i belongs to /data/batch row i: both are written at the rows /data/batch had (a file
  // from a Keel without per-sample losses gets NaN for its earlier rows).
  const hsize_t base = dataset_rows(f, kBatchPath, path_);
  if (!io::link_exists(f, kSampleLossPath, path_))
    create_extendible(f, kSampleLossPath, H5T_IEEE_F32LE, 0, kBatchChunkRows, true, path_);
  std::vector<float> losses;
  losses.reserve(batch_.size());
  for (const BatchSample& b : batch_) losses.push_back(b.loss);
  write_rows(f, kSampleLossPath, H5T_NATIVE_FLOAT, losses.data(), base, losses.size(), 0, path_, extended);
  Hid mem_type = detail::make_batch_type(/*in_file=*/false, path_);
  write_rows(f, kBatchPath, mem_type.get(), records.data(), base, records.size(), 0, path_, extended);
}

void MetricsWriter::write_source_loss(int64_t file_id, uint64_t base, Extended& extended) {
  const hid_t f = file_id;
  const bool exists = io::link_exists(f, kSourceLossPath, path_);
  const bool any = std::any_of(source_loss_.begin(), source_loss_.end(), [](const auto& r) { return !r.empty(); });
  if (batch_sources_.empty() || (!exists && !any)) return;
  const size_t cols = batch_sources_.size();
  if (!exists) {
    create_extendible(f, kSourceLossPath, H5T_IEEE_F32LE, cols, matrix_chunk_rows(cols), true, path_);
    Hid dset(check_id(H5Dopen2(f, kSourceLossPath, H5P_DEFAULT), path_, kSourceLossPath, "H5Dopen2"));
    io::write_string_array_attribute(dset.get(), "names", batch_sources_, path_, kSourceLossPath);
  }
  std::vector<float> values(source_loss_.size() * cols, std::numeric_limits<float>::quiet_NaN());  // [n, sources]
  for (size_t row = 0; row < source_loss_.size(); ++row) {
    for (size_t c = 0; c < source_loss_[row].size(); ++c)
      values[row * cols + c] = static_cast<float>(source_loss_[row][c]);
  }
  write_rows(f, kSourceLossPath, H5T_NATIVE_FLOAT, values.data(), base, source_loss_.size(), cols, path_, extended);
}

}  // namespace keel::metrics

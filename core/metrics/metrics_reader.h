// Why: `keel inspect`, the tests and any tool that checks a run need to read metrics.h5 back without
// writing HDF5 boilerplate each time. MetricsReader is deliberately small: whole 1-D series, the per-tensor
// matrices, /events, attributes and a dataset listing. It opens the file for each call and closes it again,
// so it never holds the file while a live run flushes into it. Plain C++ and the HDF5 C API: no LibTorch.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace keel::metrics {

// One row of /events.
struct Event {
  int64_t step = 0;
  std::string kind;
  std::string text;
};

// One row of /data/batch: a sample of a step's global batch (docs/metrics.md).
struct BatchRow {
  int64_t step = 0;
  int64_t slot = 0;
  int64_t source = 0;  // index into batch_sources()
  int64_t sample_id = 0;
  int64_t epoch = 0;
  int64_t chunk = 0;
  int64_t first_doc = -1;
  int64_t first_doc_offset = 0;
  int64_t n_docs = 0;
};

// What a dataset holds: dtype is "int64", "uint8", "float32", "float64", ..., "string", "compound", "other".
struct DatasetInfo {
  std::string path;
  std::string dtype;
  std::vector<int64_t> shape;
};

// A 2-D float32 dataset, row-major.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> values;
  float at(int64_t row, int64_t col) const { return values[static_cast<size_t>(row * cols + col)]; }
};

class MetricsReader {
 public:
  // Throws std::runtime_error if the file does not exist or is not HDF5.
  explicit MetricsReader(std::string path);

  const std::string& path() const { return path_; }

  // A 1-D numeric dataset (any integer or float type) converted to double, e.g. "/train/loss".
  std::vector<double> read_double(const std::string& dataset) const;
  // A 1-D integer dataset, e.g. "/train/step". Throws for a float dataset.
  std::vector<int64_t> read_int64(const std::string& dataset) const;
  // A 2-D numeric dataset as float32, e.g. "/train/tensor/grad_norm".
  Matrix read_matrix(const std::string& dataset) const;
  // All rows of /events.
  std::vector<Event> read_events() const;
  // All rows of /data/batch, in file order (empty if the run recorded none).
  std::vector<BatchRow> read_batch() const;
  // The `sources` attribute of /data/batch.
  std::vector<std::string> batch_sources() const;
  // The batch each step trained on, by step: a step's rows form one block (slots 0, 1, ...); when a step was run
  // again (a rollback, a resume from an earlier checkpoint) its later block is the one kept, as for /train rows.
  std::map<int64_t, std::vector<BatchRow>> read_batches_by_step() const;
  // The attributes of /config as (key, value) pairs, sorted by key.
  std::vector<std::pair<std::string, std::string>> read_config() const;
  // A string attribute of any object ("/" for the root); a scalar attribute gives one element.
  std::vector<std::string> read_string_attribute(const std::string& object, const std::string& name) const;

  bool has_dataset(const std::string& dataset) const;
  DatasetInfo info(const std::string& dataset) const;
  // Every dataset in the file, sorted by path.
  std::vector<DatasetInfo> list_datasets() const;

 private:
  std::string path_;
};

}  // namespace keel::metrics

// Why: everything a run does must be readable later without Keel, including after the run is killed or its
// disk fills up. MetricsWriter owns RUN_DIR/metrics.h5: it buffers step rows, events and plugin scalars in
// memory and, every `flush_every` steps, opens the file, appends the buffered rows and closes it again. Between
// flushes the file is closed and fully consistent, so a SIGKILL loses at most the rows since the last flush
// and h5py/h5dump read everything before it. A flush that cannot write (a full disk) throws MetricsWriteError
// and leaves the file as the last good flush left it. The layout is documented in docs/metrics.md. Plain C++
// and the HDF5 C API: no LibTorch, so this header can be included anywhere.
//
// Not thread-safe; HDF5 (Debian's serial build) is not thread-safe either, so all HDF5 users in one process
// must call it from one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace keel::metrics {

// A flush that could not write metrics.h5. One line naming the file, the OS error (or HDF5's reason) and the
// rows that are not in the file: "metrics: cannot write /x/run/metrics.h5: No space left on device (rows
// 1020-1024 not written)". The file still holds every row of the earlier flushes, readable by h5py.
class MetricsWriteError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One sample of a step's global batch as it goes into /data/batch (docs/metrics.md).
struct BatchSample {
  int64_t slot = 0;       // position in the global batch
  int64_t source = 0;     // index into the names given to set_batch_sources()
  int64_t sample_id = 0;  // unpermuted sample id within the source
  int64_t epoch = 0;
  int64_t chunk = 0;
  int64_t first_doc = -1;  // documents the window covers (core/data/documents.h); -1: no document index
  int64_t first_doc_offset = 0;
  int64_t n_docs = 0;
  // The sample's mean token loss in this step (/data/sample_loss, the same row); NaN when not measured.
  float loss = std::numeric_limits<float>::quiet_NaN();
};

// One optimizer step as it goes into /train/*. Per-tensor norms are in the column order of the writer's
// tensor_names; leave them empty to store NaN for that step (e.g. a step that computed no norms).
struct StepRow {
  int64_t step = 0;
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  int64_t tokens = 0;  // cumulative tokens consumed up to and including this step
  double tokens_per_s = 0.0;
  double step_time_s = 0.0;
  bool skipped = false;  // the update was skipped (spike handler's SKIP_UPDATE, non-finite grads, ...)
  std::vector<float> tensor_grad_norms;
  std::vector<float> tensor_param_norms;
  // The step's samples, one /data/batch row each, written in the same flush as the step's /train row; empty
  // writes none. Needs set_batch_sources() first.
  std::vector<BatchSample> batch;
  // The step's mean loss per source of the batch (/train/source_loss, columns in set_batch_sources() order; NaN
  // for a source with no sample in the step). Empty stores a row of NaN once the dataset exists.
  std::vector<double> source_loss;
};

// Longest kind / text an /events row stores in full (bytes of UTF-8).
constexpr size_t kEventKindMaxBytes = 31;
constexpr size_t kEventTextMaxBytes = 511;

enum class OpenMode {
  kCreate,  // create a new file; error if it already exists
  kAppend,  // open an existing file (a resumed run) and continue its tables; error if it does not exist
};

class MetricsWriter {
 public:
  // path: the metrics file, normally RUN_DIR/metrics.h5 (the directory must exist).
  // config_attributes: one string attribute per key on group /config. In kAppend mode existing keys are
  //   kept; a new key is added, and a key whose value differs is recorded as a "config_changed" event.
  // tensor_names: columns of /train/tensor/{grad_norm,param_norm}; empty = no per-tensor matrices. In
  //   kAppend mode they must equal the names stored in the file.
  // flush_every: append() flushes after this many buffered rows (>= 1).
  // Throws std::runtime_error naming the file (and object) on any HDF5 or validation failure.
  MetricsWriter(std::string path, OpenMode mode, std::vector<std::pair<std::string, std::string>> config_attributes,
                std::vector<std::string> tensor_names, int64_t flush_every);
  // Flushes; never throws (a failure is logged with spdlog::error). After a flush has thrown
  // MetricsWriteError it does not try again: that failure was reported once, by the exception.
  ~MetricsWriter();

  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  // The source names of /data/batch (its `sources` attribute; BatchSample::source indexes them) and the columns of
  // /train/source_loss (its `names`). Call before the first row with samples. Throws std::runtime_error naming the
  // file if it already holds /data/batch or /train/source_loss with other names.
  void set_batch_sources(std::vector<std::string> names);

  // Buffers one step row; flushes when flush_every rows are buffered. Throws std::invalid_argument if the
  // per-tensor vectors have the wrong length.
  void append(const StepRow& row);
  // event() and scalar() rows are written with the next flush (automatic every flush_every append()s, or
  // call flush() to make one durable now, e.g. right after a checkpoint event).
  // Buffers one /events row (kind: short tag such as "spike", "skip", "checkpoint"; text: free form).
  // The file stores fixed-length strings (crash safety, see docs/metrics.md): kind keeps kEventKindMaxBytes
  // bytes, text kEventTextMaxBytes; longer strings are cut at a UTF-8 boundary and end in "...".
  void event(int64_t step, const std::string& kind, const std::string& text);
  // Buffers one value of the plugin/extra series /train/extra/<name> (with /train/extra/<name>_step).
  // name: non-empty, no '/', not ending in "_step", not "." or "..".
  void scalar(int64_t step, const std::string& name, double value);
  // Buffers one row of the instability precursors (metrics.stats_every, docs/metrics.md): each named series is
  // /stats/<name>, float32, 1-D when it has one value and [rows, values] otherwise, one row per stats step, with
  // /stats/step (written last, as /train/step) naming the step. A series keeps its length from row to row; a
  // series missing from a row is NaN there. Throws std::invalid_argument on an empty or '/'-containing name or
  // a length that differs from an earlier buffered row's.
  void stats(int64_t step, std::vector<std::pair<std::string, std::vector<float>>> series);
  // Writes everything buffered and closes the file. No-op if nothing is buffered. Before touching the file
  // it reserves on disk the most this flush can add (new chunks plus metadata room), so a full disk fails
  // here, before HDF5 has written anything. Throws MetricsWriteError if the file cannot be written; the file
  // then keeps exactly the rows of the earlier flushes (datasets extended by this flush are cut back). Safe
  // to retry: rows are written at fixed offsets and dropped from the buffer only once written.
  void flush();
  // True once a flush has thrown MetricsWriteError and no later flush has succeeded.
  bool failed() const { return failed_; }

  const std::string& path() const { return path_; }
  const std::vector<std::string>& tensor_names() const { return tensor_names_; }
  // Rows of /train/* in the file plus those still buffered.
  int64_t rows() const { return rows_in_file_ + static_cast<int64_t>(steps_.size()); }
  int64_t buffered_rows() const { return static_cast<int64_t>(steps_.size()); }

 private:
  struct ExtraPoint {
    int64_t step;
    double value;
  };
  struct Event {
    int64_t step;
    std::string kind;
    std::string text;
  };

  void create_file(const std::vector<std::pair<std::string, std::string>>& config_attributes, bool& created);
  void open_existing(const std::vector<std::pair<std::string, std::string>>& config_attributes);
  void clear_train_buffer();
  using Extended = std::vector<std::pair<std::string, uint64_t>>;  // (dataset, rows before this flush)
  void write_buffered(int64_t file_id, Extended& extended);
  uint64_t flush_bound_bytes() const;
  void write_batch(int64_t file_id, Extended& extended);
  void write_source_loss(int64_t file_id, uint64_t base, Extended& extended);
  void write_stats(int64_t file_id, Extended& extended);

  std::string path_;
  std::vector<std::string> tensor_names_;
  int64_t flush_every_;
  int64_t rows_in_file_ = 0;
  int64_t events_in_file_ = 0;
  bool failed_ = false;

  // Column buffers of /train/* (one entry per buffered step).
  std::vector<int64_t> steps_;
  std::vector<double> loss_;
  std::vector<double> grad_norm_;
  std::vector<double> lr_;
  std::vector<int64_t> tokens_;
  std::vector<double> tokens_per_s_;
  std::vector<double> step_time_s_;
  std::vector<uint8_t> skipped_;
  std::vector<float> tensor_grad_norms_;   // [buffered steps, n_tensors], row-major
  std::vector<float> tensor_param_norms_;  // [buffered steps, n_tensors], row-major

  std::vector<std::string> batch_sources_;
  std::vector<std::vector<double>> source_loss_;  // per buffered step: its /train/source_loss row (empty: NaN)
  std::vector<BatchSample> batch_;                // buffered /data/batch rows (and their /data/sample_loss)
  std::vector<int64_t> batch_steps_;              // the step of each buffered batch row
  int64_t batch_rows_in_file_ = 0;

  std::vector<Event> events_;
  // Buffered /stats rows: the step of each, and per row its named series.
  std::vector<int64_t> stats_steps_;
  std::vector<std::vector<std::pair<std::string, std::vector<float>>>> stats_rows_;
  int64_t stats_rows_in_file_ = 0;
  std::vector<std::pair<std::string, std::vector<ExtraPoint>>> extras_;  // insertion order kept
};

}  // namespace keel::metrics

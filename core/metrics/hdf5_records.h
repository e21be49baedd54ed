// Why: metrics.h5's two compound row types (/events and /data/batch) are written by metrics_writer.cpp and read by
// metrics_reader.cpp, so their in-memory structs and HDF5 types live in one place beside the two. Generic HDF5
// access (ids, checks, attributes) is core/io/hdf5.h. Plain C++ and the HDF5 C API only: no LibTorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/io/hdf5.h"

namespace keel::metrics::detail {

using io::Hid;

// One /events row, in memory and (packed, little-endian) in the file. Fixed-length strings on purpose: a
// variable-length string lives in HDF5's global heap, which is written *after* the raw rows that point to it
// when a file is closed, so a kill inside H5Fclose could leave rows pointing at a heap that is not there.
// Fixed-length rows are plain raw data, as safe as the numeric columns.
constexpr size_t kEventKindBytes = 32;   // including the terminating NUL
constexpr size_t kEventTextBytes = 512;  // including the terminating NUL
struct EventRecord {
  int64_t step;
  char kind[kEventKindBytes];
  char text[kEventTextBytes];
};
// The compound type {step: int64, kind: S32, text: S512}; `in_file` picks little-endian int64 over native.
Hid make_event_type(bool in_file, const std::string& file);
// One /data/batch row (a sample of a step's global batch) in memory; in the file its fields are packed
// little-endian integers of the widths docs/metrics.md lists (h5py gives one plain structured array).
struct BatchRecord {
  int64_t step;
  int64_t slot;       // position in the global batch
  int64_t source;     // index into the dataset's `sources` attribute
  int64_t sample_id;  // unpermuted sample id within the source
  int64_t epoch;
  int64_t chunk;
  int64_t first_doc;         // first document the sample's window covers (-1: no document index)
  int64_t first_doc_offset;  // tokens of first_doc before the window starts
  int64_t n_docs;            // documents first_doc .. first_doc + n_docs - 1
};
// The compound type of BatchRecord: in memory (native int64 fields at BatchRecord's offsets) or, with `in_file`,
// as stored (packed, narrower little-endian fields).
Hid make_batch_type(bool in_file, const std::string& file);
// Copies `s` into `dst` (NUL-terminated, `size` bytes including the NUL); a longer string is cut at a UTF-8
// character boundary and ends in "...".
void copy_truncated(const std::string& s, char* dst, size_t size);

}  // namespace keel::metrics::detail

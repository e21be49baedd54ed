// Why: metrics, checkpoints and eval make many HDF5 C API calls, and every one of them must be checked and
// every id closed on every path (including exceptions), or a failed flush would leak ids and keep the file
// open between flushes — which is exactly what crash safety relies on not happening. This header gives them
// one RAII id wrapper, one "check or throw" helper whose message names the file, the object and HDF5's own
// innermost error text (and no module prefix: the caller adds its own), the file-access settings and the
// string attribute and time helpers they share. Plain C++ and the HDF5 C API only: no LibTorch.
#pragma once

#include <hdf5.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace keel::io {

// Owns one HDF5 id and closes it with the right H5*close function (chosen from H5Iget_type) when it goes
// out of scope. Move-only.
class Hid {
 public:
  Hid() = default;
  explicit Hid(hid_t id) : id_(id) {}
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  Hid(Hid&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
  Hid& operator=(Hid&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  ~Hid() { reset(); }

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes the id now; returns false if HDF5 reported an error while closing (e.g. H5Fclose failing to
  // write the last metadata). The id is forgotten either way; HDF5 may keep it, so a failed close also
  // calls silence_hdf5_for_good().
  bool reset();

 private:
  hid_t id_ = H5I_INVALID_HID;
};

// Silences HDF5's automatic error-stack printing to stderr for the lifetime of the object (restored after),
// so that failures surface once, as our exception, instead of as a page of HDF5 trace. Once a file has failed
// to close (silence_hdf5_for_good), it is not restored: HDF5 1.10 keeps such a file's id and, at exit, prints
// "infinite loop closing library" for it unless its error printing is off.
class QuietHdf5Errors {
 public:
  QuietHdf5Errors();
  ~QuietHdf5Errors();
  QuietHdf5Errors(const QuietHdf5Errors&) = delete;
  QuietHdf5Errors& operator=(const QuietHdf5Errors&) = delete;

 private:
  H5E_auto2_t old_func_ = nullptr;
  void* old_data_ = nullptr;
};

// Turns HDF5's error printing off for the rest of the process (see QuietHdf5Errors). Called when a file id
// could not be closed; the error that caused it has been reported once already, as an exception.
void silence_hdf5_for_good();

// `text` on one line: every control character (newline, tab, ...) becomes a space.
std::string one_line(const std::string& text);

// The innermost messages on HDF5's current error stack, on one line, e.g. "unable to open file: No such file
// or directory"; an OS error inside HDF5's long "file write failed: time = ..., errno = 28, error message =
// '...', ..." becomes "file write failed: No space left on device". "" when the stack is empty.
std::string hdf5_error_text();
// The operating system's message on HDF5's current error stack ("No space left on device"), or "". Both
// functions turn HDF5's error printing off for good when the stack holds an I/O error: HDF5 1.10 can keep
// state of such a file that it would report at exit as "infinite loop closing library".
std::string hdf5_os_error_text();
// The OS error the last of those two calls found ("" if none since clear_last_os_error()): for a caller that
// catches another layer's exception after HDF5's error stack is gone (e.g. a checkpoint::H5Writer error).
std::string last_os_error();
void clear_last_os_error();

// What fail() throws: a one-line std::runtime_error, plus the OS error HDF5 met (if any) and the failing call
// without the file name, so a caller that names the file itself can say "cannot write FILE: <reason()>".
class Hdf5Error : public std::runtime_error {
 public:
  Hdf5Error(const std::string& message, std::string os_error, std::string call)
      : std::runtime_error(message), os_error_(std::move(os_error)), call_(std::move(call)) {}
  const std::string& os_error() const { return os_error_; }
  // The OS error when there is one, else "<what> failed for '<object>' (HDF5: ...)".
  const std::string& reason() const { return os_error_.empty() ? call_ : os_error_; }

 private:
  std::string os_error_;
  std::string call_;
};

// Throws Hdf5Error("<file>: <what> failed for '<object>' (HDF5: <hdf5 message>)") when the
// return value of an HDF5 call signals failure (negative), otherwise returns it unchanged.
hid_t check_id(hid_t id, const std::string& file, const std::string& object, const char* what);
herr_t check(herr_t status, const std::string& file, const std::string& object, const char* what);
htri_t check_tri(htri_t status, const std::string& file, const std::string& object, const char* what);
[[noreturn]] void fail(const std::string& file, const std::string& object, const std::string& what);

// File-access property list of every HDF5 file Keel opens: file locking off (so a reader can open the file
// while the trainer has it open for a flush, and vice versa), STRONG close degree (H5Fclose really closes),
// default (earliest) library-version bounds so that any HDF5 1.8+/h5py can read the file.
Hid make_fapl(const std::string& file);

// A variable-length UTF-8 string datatype (h5py reads it as `str`).
Hid make_vlen_string_type(const std::string& file);

// Scalar string attribute `name` on object `loc` (replaced if it exists), stored as variable-length UTF-8.
void write_string_attribute(hid_t loc, const std::string& name, const std::string& value, const std::string& file,
                            const std::string& object);
// 1-D string attribute (variable-length UTF-8), replaced if it exists.
void write_string_array_attribute(hid_t loc, const std::string& name, const std::vector<std::string>& values,
                                  const std::string& file, const std::string& object);
// Reads a string attribute (variable- or fixed-length, scalar or 1-D) as a list of strings; a scalar gives
// one element. Throws if the attribute is missing or not a string.
std::vector<std::string> read_string_attribute(hid_t loc, const std::string& name, const std::string& file,
                                               const std::string& object);

// True if `path` (e.g. "/train/extra/foo") exists as a link, checking each intermediate group.
bool link_exists(hid_t loc, const std::string& path, const std::string& file);

// Current UTC time as ISO 8601, "2024-05-01T12:34:56Z".
std::string utc_now_iso8601();

}  // namespace keel::io

// Why: see hdf5.h — one place for HDF5 id lifetime, error checking and the file-access settings that make
// metrics.h5 readable while a run goes on and after it is killed, and checkpoints readable by h5py.
#include "core/io/hdf5.h"

#include <cstddef>
#include <cstring>
#include <ctime>
#include <stdexcept>

namespace keel::io {

bool Hid::reset() {
  if (id_ < 0) return true;
  const hid_t id = std::exchange(id_, H5I_INVALID_HID);
  herr_t status = 0;
  switch (H5Iget_type(id)) {
    case H5I_FILE:
      status = H5Fclose(id);
      break;
    case H5I_GROUP:
      status = H5Gclose(id);
      break;
    case H5I_DATASET:
      status = H5Dclose(id);
      break;
    case H5I_DATASPACE:
      status = H5Sclose(id);
      break;
    case H5I_DATATYPE:
      status = H5Tclose(id);
      break;
    case H5I_ATTR:
      status = H5Aclose(id);
      break;
    case H5I_GENPROP_LST:
      status = H5Pclose(id);
      break;
    default:
      status = H5Idec_ref(id);
      break;
  }
  if (status < 0) silence_hdf5_for_good();
  return status >= 0;
}

namespace {

bool silenced_for_good = false;

}  // namespace

void silence_hdf5_for_good() {
  silenced_for_good = true;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

QuietHdf5Errors::QuietHdf5Errors() {
  H5Eget_auto2(H5E_DEFAULT, &old_func_, &old_data_);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

QuietHdf5Errors::~QuietHdf5Errors() {
  if (!silenced_for_good) H5Eset_auto2(H5E_DEFAULT, old_func_, old_data_);
}

std::string one_line(const std::string& text) {
  std::string line = text;
  for (char& c : line) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  }
  return line;
}

namespace {

// HDF5's low-level I/O errors read "file write failed: time = ..., filename = '...', file descriptor = 5,
// errno = 28, error message = 'No space left on device', buf = ..., ...": the OS message, or "" if none.
std::string os_error_of(const std::string& desc) {
  const std::string key = "error message = '";
  const size_t begin = desc.find(key);
  if (begin == std::string::npos) return "";
  const size_t end = desc.find('\'', begin + key.size());
  if (end == std::string::npos) return "";
  return desc.substr(begin + key.size(), end - begin - key.size());
}

// One stack entry, short: "file write failed: No space left on device" for an I/O error, else its text.
std::string short_description(const std::string& desc) {
  const std::string os_error = os_error_of(desc);
  if (os_error.empty()) return desc;
  const size_t colon = desc.find(": ");
  return (colon == std::string::npos ? std::string("I/O failed") : desc.substr(0, colon)) + ": " + os_error;
}

herr_t collect_error(unsigned /*n*/, const H5E_error2_t* err, void* client_data) {
  auto* messages = static_cast<std::vector<std::string>*>(client_data);
  if (err != nullptr && err->desc != nullptr && err->desc[0] != '\0') messages->emplace_back(one_line(err->desc));
  return 0;
}

std::vector<std::string> error_stack() {
  std::vector<std::string> messages;
  // H5E_WALK_UPWARD starts at the innermost (most specific) error.
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_error, &messages);
  return messages;
}

std::string last_os_error_found;  // NOLINT: one HDF5-using thread per process (see metrics_writer.h)

}  // namespace

std::string last_os_error() { return last_os_error_found; }

void clear_last_os_error() { last_os_error_found.clear(); }

std::string hdf5_os_error_text() {
  for (const auto& message : error_stack()) {
    const std::string os_error = os_error_of(message);
    if (!os_error.empty()) {
      last_os_error_found = os_error;
      // After an I/O error HDF5 1.10 can keep internal state of the file (even when every id closed) that it
      // reports at exit as "infinite loop closing library"; the error itself is being reported now.
      silence_hdf5_for_good();
      return os_error;
    }
  }
  return "";
}

std::string hdf5_error_text() {
  const std::vector<std::string> messages = error_stack();
  std::string text;
  for (size_t i = 0; i < messages.size() && i < 3; ++i) {
    if (!text.empty()) text += "; ";
    text += short_description(messages[i]);
  }
  hdf5_os_error_text();  // silences HDF5 for good after an I/O error
  return text;
}

void fail(const std::string& file, const std::string& object, const std::string& what) {
  std::string call = what + " failed for '" + object + "'";
  const std::string detail = hdf5_error_text();
  if (!detail.empty()) call += " (HDF5: " + detail + ")";
  throw Hdf5Error(one_line(file + ": " + call), hdf5_os_error_text(), one_line(call));
}

hid_t check_id(hid_t id, const std::string& file, const std::string& object, const char* what) {
  if (id < 0) fail(file, object, what);
  return id;
}

herr_t check(herr_t status, const std::string& file, const std::string& object, const char* what) {
  if (status < 0) fail(file, object, what);
  return status;
}

htri_t check_tri(htri_t status, const std::string& file, const std::string& object, const char* what) {
  if (status < 0) fail(file, object, what);
  return status;
}

Hid make_fapl(const std::string& file) {
  Hid fapl(check_id(H5Pcreate(H5P_FILE_ACCESS), file, "/", "H5Pcreate(file access)"));
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), file, "/", "H5Pset_fclose_degree");
  // Default libver bounds (earliest): readable by every HDF5 1.8+ and h5py. Set explicitly so that a
  // changed library default cannot silently produce files old readers reject.
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_EARLIEST, H5F_LIBVER_LATEST), file, "/", "H5Pset_libver_bounds");
  // HDF5 >= 1.10.7 takes an flock() on open; a reader holding the file would then make the trainer's flush
  // fail. The metrics file is only ever written by one process, so locking buys nothing here.
  // (The environment variable HDF5_USE_FILE_LOCKING=FALSE has the same effect for other programs.)
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
  check(H5Pset_file_locking(fapl.get(), /*use_file_locking=*/0, /*ignore_when_disabled=*/1), file, "/",
        "H5Pset_file_locking");
#endif
  return fapl;
}

Hid make_vlen_string_type(const std::string& file) {
  Hid type(check_id(H5Tcopy(H5T_C_S1), file, "string type", "H5Tcopy"));
  check(H5Tset_size(type.get(), H5T_VARIABLE), file, "string type", "H5Tset_size(H5T_VARIABLE)");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), file, "string type", "H5Tset_cset(UTF8)");
  return type;
}

namespace {

void write_string_attribute_impl(hid_t loc, const std::string& name, const std::vector<std::string>& values,
                                 bool scalar, const std::string& file, const std::string& object) {
  const std::string what = object + " attribute " + name;
  if (check_tri(H5Aexists(loc, name.c_str()), file, what, "H5Aexists") > 0) {
    check(H5Adelete(loc, name.c_str()), file, what, "H5Adelete");
  }
  Hid type = make_vlen_string_type(file);
  const hsize_t n = values.size();
  Hid space(scalar ? check_id(H5Screate(H5S_SCALAR), file, what, "H5Screate(scalar)")
                   : check_id(H5Screate_simple(1, &n, nullptr), file, what, "H5Screate_simple"));
  Hid attr(check_id(H5Acreate2(loc, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), file, what,
                    "H5Acreate2"));
  std::vector<const char*> pointers;
  pointers.reserve(values.size());
  for (const auto& v : values) pointers.push_back(v.c_str());
  if (!pointers.empty()) check(H5Awrite(attr.get(), type.get(), pointers.data()), file, what, "H5Awrite");
  if (!attr.reset()) fail(file, what, "H5Aclose");
}

}  // namespace

void write_string_attribute(hid_t loc, const std::string& name, const std::string& value, const std::string& file,
                            const std::string& object) {
  write_string_attribute_impl(loc, name, {value}, /*scalar=*/true, file, object);
}

void write_string_array_attribute(hid_t loc, const std::string& name, const std::vector<std::string>& values,
                                  const std::string& file, const std::string& object) {
  write_string_attribute_impl(loc, name, values, /*scalar=*/false, file, object);
}

std::vector<std::string> read_string_attribute(hid_t loc, const std::string& name, const std::string& file,
                                               const std::string& object) {
  const std::string what = object + " attribute " + name;
  if (check_tri(H5Aexists(loc, name.c_str()), file, what, "H5Aexists") <= 0) {
    throw std::runtime_error(file + ": attribute '" + name + "' not found on '" + object + "'");
  }
  Hid attr(check_id(H5Aopen(loc, name.c_str(), H5P_DEFAULT), file, what, "H5Aopen"));
  Hid file_type(check_id(H5Aget_type(attr.get()), file, what, "H5Aget_type"));
  if (H5Tget_class(file_type.get()) != H5T_STRING) {
    throw std::runtime_error(file + ": attribute '" + name + "' on '" + object + "' is not a string");
  }
  Hid space(check_id(H5Aget_space(attr.get()), file, what, "H5Aget_space"));
  const hssize_t count = H5Sget_simple_extent_npoints(space.get());
  if (count < 0) fail(file, what, "H5Sget_simple_extent_npoints");
  std::vector<std::string> result;
  if (count == 0) return result;
  const htri_t is_vlen = check_tri(H5Tis_variable_str(file_type.get()), file, what, "H5Tis_variable_str");
  if (is_vlen > 0) {
    Hid mem_type = make_vlen_string_type(file);
    std::vector<char*> pointers(static_cast<size_t>(count), nullptr);
    check(H5Aread(attr.get(), mem_type.get(), pointers.data()), file, what, "H5Aread");
    for (char* p : pointers) {
      result.emplace_back(p != nullptr ? p : "");
      if (p != nullptr) H5free_memory(p);
    }
  } else {
    const size_t size = H5Tget_size(file_type.get());
    if (size == 0) fail(file, what, "H5Tget_size");
    std::vector<char> buffer(size * static_cast<size_t>(count));
    check(H5Aread(attr.get(), file_type.get(), buffer.data()), file, what, "H5Aread");
    const bool space_padded = H5Tget_strpad(file_type.get()) == H5T_STR_SPACEPAD;
    for (hssize_t i = 0; i < count; ++i) {
      std::string s(buffer.data() + static_cast<size_t>(i) * size, size);
      s = s.substr(0, s.find('\0'));
      if (space_padded) s.erase(s.find_last_not_of(' ') + 1);
      result.push_back(std::move(s));
    }
  }
  return result;
}

bool link_exists(hid_t loc, const std::string& path, const std::string& file) {
  // H5Lexists fails (rather than returning false) when an intermediate group is missing: walk the prefixes.
  size_t pos = 0;
  while (true) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (!prefix.empty() && prefix != "/") {
      if (check_tri(H5Lexists(loc, prefix.c_str(), H5P_DEFAULT), file, prefix, "H5Lexists") <= 0) return false;
    }
    if (pos == std::string::npos) return true;
  }
}

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm tm_utc{};
  gmtime_r(&now, &tm_utc);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%dT%H:%M:%SZ", &tm_utc);
  return buffer;
}

}  // namespace keel::io

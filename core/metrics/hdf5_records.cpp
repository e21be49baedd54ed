// Why: see hdf5_records.h.
#include "core/metrics/hdf5_records.h"

#include <cstring>

namespace keel::metrics::detail {

using io::check;
using io::check_id;

Hid make_event_type(bool in_file, const std::string& file) {
  auto fixed_string = [&](size_t size) {
    Hid type(check_id(H5Tcopy(H5T_C_S1), file, "/events", "H5Tcopy"));
    check(H5Tset_size(type.get(), size), file, "/events", "H5Tset_size");
    check(H5Tset_strpad(type.get(), H5T_STR_NULLTERM), file, "/events", "H5Tset_strpad");
    check(H5Tset_cset(type.get(), H5T_CSET_UTF8), file, "/events", "H5Tset_cset");
    return type;
  };
  Hid kind = fixed_string(kEventKindBytes);
  Hid text = fixed_string(kEventTextBytes);
  Hid type(check_id(H5Tcreate(H5T_COMPOUND, sizeof(EventRecord)), file, "/events", "H5Tcreate(compound)"));
  check(H5Tinsert(type.get(), "step", offsetof(EventRecord, step), in_file ? H5T_STD_I64LE : H5T_NATIVE_INT64), file,
        "/events", "H5Tinsert(step)");
  check(H5Tinsert(type.get(), "kind", offsetof(EventRecord, kind), kind.get()), file, "/events", "H5Tinsert(kind)");
  check(H5Tinsert(type.get(), "text", offsetof(EventRecord, text), text.get()), file, "/events", "H5Tinsert(text)");
  return type;
}

Hid make_batch_type(bool in_file, const std::string& file) {
  // In the file the fields are packed and only as wide as they need to be (46 bytes a sample); in memory every
  // field is an int64 of BatchRecord, and HDF5 converts by field name.
  struct Field {
    const char* name;
    size_t offset;
    hid_t file_type;
  };
  const Field fields[] = {{"step", offsetof(BatchRecord, step), H5T_STD_I64LE},
                          {"slot", offsetof(BatchRecord, slot), H5T_STD_I32LE},
                          {"source", offsetof(BatchRecord, source), H5T_STD_I16LE},
                          {"sample_id", offsetof(BatchRecord, sample_id), H5T_STD_I64LE},
                          {"epoch", offsetof(BatchRecord, epoch), H5T_STD_I32LE},
                          {"chunk", offsetof(BatchRecord, chunk), H5T_STD_I32LE},
                          {"first_doc", offsetof(BatchRecord, first_doc), H5T_STD_I64LE},
                          {"first_doc_offset", offsetof(BatchRecord, first_doc_offset), H5T_STD_I32LE},
                          {"n_docs", offsetof(BatchRecord, n_docs), H5T_STD_I32LE}};
  size_t file_size = 0;
  for (const auto& f : fields) file_size += H5Tget_size(f.file_type);
  Hid type(check_id(H5Tcreate(H5T_COMPOUND, in_file ? file_size : sizeof(BatchRecord)), file, "/data/batch",
                    "H5Tcreate(compound)"));
  size_t packed = 0;
  for (const auto& f : fields) {
    check(H5Tinsert(type.get(), f.name, in_file ? packed : f.offset, in_file ? f.file_type : H5T_NATIVE_INT64), file,
          "/data/batch", "H5Tinsert");
    packed += H5Tget_size(f.file_type);
  }
  return type;
}

void copy_truncated(const std::string& s, char* dst, size_t size) {
  std::memset(dst, 0, size);
  if (s.size() < size) {
    std::memcpy(dst, s.data(), s.size());
    return;
  }
  size_t keep = size - 4;  // room for "..." and the NUL
  // Do not cut a UTF-8 sequence: back up over continuation bytes (10xxxxxx) to a lead byte.
  while (keep > 0 && (static_cast<unsigned char>(s[keep]) & 0xC0) == 0x80) --keep;
  std::memcpy(dst, s.data(), keep);
  std::memcpy(dst + keep, "...", 3);
}

}  // namespace keel::metrics::detail

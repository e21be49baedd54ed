// Why: H5Reader is what turns a checkpoint rank file into tensors, and a rank file is only as trustworthy as the
// manifest that vouches for it: the checksum stops corruption, not a file someone built to match. This target
// is structure-aware. Its input is a small program that builds a *well-formed* HDF5 file with the HDF5 C API:
// datasets of any type, rank and (possibly huge, chunked and fill-valued) shape, fixed- and variable-length
// strings, groups, and attributes such as `dtype`, `global_shape`, `offset` or `format` with wrong types,
// lengths and values, all under the names Keel reads. It then walks the file the way read_rank_file and
// `keel inspect` do and checks that every object either reads or is refused with CheckpointError (never a
// crash, a sanitizer report, a huge allocation or another exception), and that a tensor that reads has
// exactly numel * dtype_size bytes inside its declared global shape.
//
// Why not raw bytes: libhdf5 1.10 (Debian's, uninstrumented) has memory-safety bugs in its own parser for
// malformed files (this target found a heap-use-after-free inside H5Aexists_by_name and 12 GB mallocs inside
// H5Fopen). Keel never hands libhdf5 bytes whose SHA-256 does not match the manifest (verify_checkpoint_dir
// runs first), so random corruption never reaches it; what remains is a deliberately built file, which this
// target covers. See docs/testing.md.
#include <hdf5.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/h5_file.h"

namespace {

using namespace keel::checkpoint;

[[noreturn]] void broken_promise(const char* what) {
  std::fprintf(stderr, "fuzz_checkpoint_h5: %s\n", what);
  std::abort();
}

template <typename Fn>
void refused_or_ok(Fn&& fn) {
  try {
    fn();
  } catch (const CheckpointError&) {
  }
}

// Reads the fuzz input byte by byte (zeros once it runs out).
struct Bytes {
  const uint8_t* data;
  size_t size;
  size_t at = 0;
  uint8_t next() { return at < size ? data[at++] : 0; }
  bool done() const { return at >= size; }
};

const char* const kNames[] = {"model/w",
                              "model/embed.weight",
                              "optimizer/state/w/exp_avg",
                              "rng/cpu",
                              "config",
                              "lineage",
                              "data/ledger",
                              "lr_schedule",
                              "optimizer/state_json",
                              "plugins/s/n/state",
                              "plugins/s/n/tensors/t",
                              "x"};
const char* const kGroups[] = {"/model",   "/optimizer", "/optimizer/state", "/rng",
                               "/plugins", "/plugins/s", "/plugins/s/n",     "/data"};
const char* const kAttrs[] = {"dtype", "global_shape", "offset",  "format",      "format_version",
                              "step",  "name",         "version", "tokens_seen", "keel_version"};
const char* const kDtypes[] = {"float32", "float64", "bfloat16", "float16", "int64", "int32", "uint8", "bogus", ""};

hid_t numeric_type(uint8_t b) {
  const hid_t types[] = {H5T_IEEE_F32LE, H5T_IEEE_F64LE, H5T_STD_U16LE,  H5T_STD_I64LE, H5T_STD_I32LE,
                         H5T_STD_U8LE,   H5T_STD_I8LE,   H5T_IEEE_F32BE, H5T_STD_I16BE, H5T_STD_U64LE};
  return types[b % (sizeof(types) / sizeof(types[0]))];
}

hid_t string_type(uint8_t b, size_t len) {
  const hid_t t = H5Tcopy(H5T_C_S1);
  if (b & 1) {
    H5Tset_size(t, H5T_VARIABLE);
  } else {
    H5Tset_size(t, len == 0 ? 1 : len);
  }
  H5Tset_cset(t, (b & 2) ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
  H5Tset_strpad(t, (b & 4) ? H5T_STR_NULLTERM : H5T_STR_NULLPAD);
  return t;
}

// A dataspace: scalar, or rank 1..9 with small dims, or (chunked datasets only) huge dims.
hid_t make_space(Bytes& in, bool allow_huge, hsize_t* elements) {
  const uint8_t r = in.next() % 11;
  if (r == 0) {
    *elements = 1;
    return H5Screate(H5S_SCALAR);
  }
  std::vector<hsize_t> dims(r);
  *elements = 1;
  for (auto& d : dims) {
    const uint8_t b = in.next();
    d = (allow_huge && b == 255) ? (hsize_t{1} << 40) : b % 7;
    *elements *= d;
  }
  return H5Screate_simple(static_cast<int>(r), dims.data(), nullptr);
}

void build(const std::string& path, Bytes& in) {
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (file < 0) broken_promise("cannot create the file to fuzz");
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  std::string last = "/";
  for (int op = 0; op < 24 && !in.done(); ++op) {
    const uint8_t kind = in.next() % 4;
    if (kind == 0 || kind == 1) {  // dataset: numeric (0) or string (1)
      const std::string name = kNames[in.next() % (sizeof(kNames) / sizeof(kNames[0]))];
      const bool chunked = in.next() & 1;
      hsize_t elements = 0;
      const hid_t space = make_space(in, chunked, &elements);
      const size_t len = in.next() % 40;
      const hid_t type = kind == 0 ? H5Tcopy(numeric_type(in.next())) : string_type(in.next(), len);
      const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
      if (chunked && H5Sget_simple_extent_ndims(space) > 0) {
        std::vector<hsize_t> chunk(static_cast<size_t>(H5Sget_simple_extent_ndims(space)), 1);
        H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
      }
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      const hid_t dset = H5Dcreate2(file, name.c_str(), type, space, lcpl, dcpl, H5P_DEFAULT);
      if (dset >= 0) {
        if (!chunked && elements > 0 && elements < 4096 && kind == 0) {
          std::vector<uint8_t> buffer(elements * H5Tget_size(type));
          for (auto& b : buffer) b = in.next();
          H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer.data());
        } else if (kind == 1 && elements == 1 && H5Tis_variable_str(type) <= 0) {
          std::string text(len == 0 ? 1 : len, '\0');
          for (auto& c : text) c = static_cast<char>(in.next());
          H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data());
        }
        H5Dclose(dset);
        last = name;
      }
      H5Pclose(dcpl);
      H5Tclose(type);
      H5Sclose(space);
    } else if (kind == 2) {  // group
      const hid_t g =
          H5Gcreate2(file, kGroups[in.next() % (sizeof(kGroups) / sizeof(kGroups[0]))], lcpl, H5P_DEFAULT, H5P_DEFAULT);
      if (g >= 0) H5Gclose(g);
    } else {  // attribute on the last object or the root
      const std::string object = (in.next() & 1) ? last : "/";
      const std::string name = kAttrs[in.next() % (sizeof(kAttrs) / sizeof(kAttrs[0]))];
      const uint8_t how = in.next();
      hsize_t elements = 0;
      const hid_t space = (how & 1) ? make_space(in, false, &elements) : H5Screate(H5S_SCALAR);
      if (elements == 0 && H5Sget_simple_extent_type(space) == H5S_SCALAR) elements = 1;
      std::string value =
          (how & 2) ? kDtypes[in.next() % (sizeof(kDtypes) / sizeof(kDtypes[0]))] : "keel-checkpoint-rank";
      const hid_t type = (how & 4) ? H5Tcopy(numeric_type(in.next())) : string_type(in.next() & 6, value.size());
      H5Adelete_by_name(file, object.c_str(), name.c_str(), H5P_DEFAULT);
      const hid_t attr =
          H5Acreate_by_name(file, object.c_str(), name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      if (attr >= 0) {
        if (elements > 0 && elements < 4096) {
          std::vector<uint8_t> buffer(elements * H5Tget_size(type) + value.size() + 1, 0);
          if (how & 4) {
            for (auto& b : buffer) b = in.next();
          } else {
            for (hsize_t e = 0; e < elements; ++e)
              value.copy(reinterpret_cast<char*>(buffer.data()) + e * H5Tget_size(type),
                         std::min(value.size(), H5Tget_size(type)));
          }
          if (H5Tis_variable_str(type) <= 0) H5Awrite(attr, type, buffer.data());
        }
        H5Aclose(attr);
      }
      H5Tclose(type);
      H5Sclose(space);
    }
  }
  H5Pclose(lcpl);
  if (H5Fclose(file) < 0) broken_promise("cannot close the file to fuzz");
}

void walk(const std::string& path) {
  refused_or_ok([&] {
    const H5Reader in(path);
    for (const char* attr : {"format", "keel_version"}) refused_or_ok([&] { in.string_attribute("/", attr); });
    for (const char* attr : {"format_version", "step", "tokens_seen"})
      refused_or_ok([&] { in.int_attribute("/", attr); });
    for (const char* group : {"/plugins", "/plugins/s", "/model"}) refused_or_ok([&] { in.groups_under(group); });
    std::vector<std::string> names;
    refused_or_ok([&] { names = in.datasets_under("/"); });
    for (const auto& name : names) {
      refused_or_ok([&] {
        const RawTensor t = in.read_tensor(name);
        if (static_cast<int64_t>(t.bytes.size()) != t.numel() * static_cast<int64_t>(dtype_size(t.dtype)))
          broken_promise("tensor bytes do not match its shape");
        if (t.global_shape.size() != t.shape.size() || t.offset.size() != t.shape.size())
          broken_promise("global_shape/offset rank differs from the tensor's");
        for (size_t d = 0; d < t.shape.size(); ++d) {
          if (t.offset[d] < 0 || t.offset[d] + t.shape[d] > t.global_shape[d])
            broken_promise("piece outside its tensor");
        }
      });
      refused_or_ok([&] { in.read_text(name); });
      refused_or_ok([&] { in.string_attribute(name, "dtype"); });
      refused_or_ok([&] { in.int_attribute(name, "step"); });
    }
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = std::string(::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") +
                                  "/keel-fuzz-h5-" + std::to_string(::getpid()) + ".h5";
  Bytes in{data, size};
  build(path, in);
  walk(path);
  ::unlink(path.c_str());
  return 0;
}

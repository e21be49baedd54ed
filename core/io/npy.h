// Why: NumPy's .npy is how OLMo ships token arrays (`source.NAME.format = npy`, core/data/pretokenized.*) and how a
// user hands token rows to `keel score --tokens` (core/eval/score.*). One parser of its header serves both, so a
// file one of them accepts is read the same way by the other. Format 1.0, 2.0 and 3.0 (magic "\x93NUMPY", version,
// header length, a Python dict literal with 'descr', 'fortran_order' and 'shape'). Integer dtypes only: token ids
// are integers. Torch-free, so the pre-tokenized fuzzer links it alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace keel::io {

inline constexpr char kNpyMagic[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

struct NpyHeader {
  std::string descr;               // "<u2", "|u1", ">i8", ...
  int width = 0;                   // bytes per element: 1, 2, 4 or 8
  bool is_signed = false;          // 'i' (true) or 'u'
  bool big_endian = false;         // '>' with width > 1
  std::vector<int64_t> shape;      // C order; () is a scalar
  int64_t data_offset = 0;         // where the array starts in the file
  int64_t count() const;           // product of shape (elements); -1 on overflow
  std::string shape_text() const;  // as NumPy prints it: "(2, 3)", "(5,)"
};

// Parses the header at the start of `bytes` (the first bytes of the file; `path` names it in errors): the magic,
// version, header length, an integer 'descr', 'fortran_order' False and 'shape'. Throws FileError(path,
// "offset N: REASON"), e.g. "offset 0: bad magic, expected \"\x93NUMPY\" (not an .npy file)" or "offset 10: dtype
// '<f4' is a float type: token ids are integers". Does not look at the data bytes.
NpyHeader parse_npy_header(const std::string& path, const unsigned char* bytes, size_t size);

}  // namespace keel::io

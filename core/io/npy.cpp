// Why: see npy.h.
#include "core/io/npy.h"

#include <cstring>
#include <limits>
#include <regex>

#include "core/io/file.h"

namespace keel::io {
namespace {

[[noreturn]] void fail(const std::string& path, int64_t offset, const std::string& what) {
  throw FileError(path, "offset " + std::to_string(offset) + ": " + what);
}

uint64_t load_le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

}  // namespace

int64_t NpyHeader::count() const {
  int64_t n = 1;
  for (const int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

std::string NpyHeader::shape_text() const {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

NpyHeader parse_npy_header(const std::string& path, const unsigned char* bytes, size_t size) {
  const auto n = static_cast<int64_t>(size);
  if (n < 10 || std::memcmp(bytes, kNpyMagic, 6) != 0)
    fail(path, 0, "bad magic, expected \"\\x93NUMPY\" (not an .npy file)");
  const int major = bytes[6];
  int64_t header_len = 0, dict_at = 0;
  if (major == 1) {
    header_len = static_cast<int64_t>(load_le(bytes + 8, 2));
    dict_at = 10;
  } else if (major == 2 || major == 3) {
    if (n < 12) fail(path, n, "truncated .npy header");
    header_len = static_cast<int64_t>(load_le(bytes + 8, 4));
    dict_at = 12;
  } else {
    fail(path, 6,
         "unsupported .npy version " + std::to_string(major) + "." + std::to_string(bytes[7]) +
             " (this Keel reads 1.0, 2.0 and 3.0)");
  }
  if (header_len > n - dict_at) {
    fail(path, n,
         "truncated: the .npy header says " + std::to_string(header_len) + " bytes of dict, the file has " +
             std::to_string(n - dict_at));
  }
  const std::string dict(reinterpret_cast<const char*>(bytes + dict_at), static_cast<size_t>(header_len));
  std::smatch m;
  if (!std::regex_search(dict, m, std::regex(R"('descr'\s*:\s*'([<>|=])([iuf])(\d+)')"))) {
    fail(path, dict_at, "no 'descr' of a numeric type in the .npy header " + dict);
  }
  NpyHeader h;
  const std::string order = m[1], kind = m[2];
  h.descr = order + kind + m[3].str();
  if (kind == "f") fail(path, dict_at, "dtype '" + h.descr + "' is a float type: token ids are integers");
  const std::string digits = m[3].str();
  h.width = digits.size() == 1 ? digits[0] - '0' : 0;
  if (h.width != 1 && h.width != 2 && h.width != 4 && h.width != 8) {
    fail(path, dict_at, "dtype '" + h.descr + "' is not a 1, 2, 4 or 8-byte integer");
  }
  h.is_signed = kind == "i";
  h.big_endian = order == ">" && h.width > 1;
  if (!std::regex_search(dict, std::regex(R"('fortran_order'\s*:\s*False)"))) {
    fail(path, dict_at, "'fortran_order' is not False in the .npy header " + dict);
  }
  if (!std::regex_search(dict, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))"))) {
    fail(path, dict_at, "no 'shape' tuple in the .npy header " + dict);
  }
  const std::string dims = m[1];
  static const std::regex dim(R"(\s*(\d{1,18})\s*(,|$))");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), dim); it != std::sregex_iterator(); ++it) {
    h.shape.push_back(std::stoll((*it)[1].str()));
  }
  if (dims.find_first_not_of(" ,0123456789") != std::string::npos ||
      (h.shape.empty() && !dims.empty() && dims.find_first_not_of(" ") != std::string::npos)) {
    fail(path, dict_at, "'shape' (" + dims + ") is not a tuple of sizes in the .npy header " + dict);
  }
  h.data_offset = dict_at + header_len;
  return h;
}

}  // namespace keel::io

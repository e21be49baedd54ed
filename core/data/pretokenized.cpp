// Why: see pretokenized.h. Integers are assembled byte by byte so the formats read little-endian on any host; every
// size and offset from a file is checked against the file's real size before it is used, with overflow in mind
// (the fuzz target tests/fuzz/fuzz_megatron_idx.cpp feeds the .idx parser arbitrary bytes).
#include "core/data/pretokenized.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>
#include <utility>

#include "core/data/shard.h"
#include "core/io/file.h"
#include "core/io/regular_file.h"

namespace keel::data {
namespace {

uint64_t load_le(const unsigned char* p, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

int64_t load_signed(const unsigned char* p, int width) {
  const uint64_t v = load_le(p, width);
  if (width == 8) return static_cast<int64_t>(v);
  const uint64_t sign = uint64_t(1) << (8 * width - 1);
  return static_cast<int64_t>((v ^ sign) - sign);  // sign-extend
}

[[noreturn]] void fail(const std::string& path, int64_t offset, const std::string& what) {
  throw DataError(path + ": offset " + std::to_string(offset) + ": " + what);
}

std::string file_size_text(int64_t bytes) { return "file is " + std::to_string(bytes) + " bytes"; }

// Opens `path` read-only without waiting on a FIFO; returns the fd and its size. Throws DataError.
int open_regular(const std::string& path, const std::string& what_file, int64_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    io::require_regular_file<DataError>(path, what_file);
    fail(path, 0, "cannot open " + what_file + ": " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, 0, "cannot stat " + what_file + ": " + std::strerror(err));
  }
  if (const std::string kind = io::non_regular_kind(st.st_mode); !kind.empty()) {
    ::close(fd);
    throw DataError(path + ": is " + kind + ", not " + what_file);
  }
  size = st.st_size;
  return fd;
}

std::string read_whole(const std::string& path, const std::string& what_file) {
  int64_t size = 0;
  const int fd = open_regular(path, what_file, size);
  std::string bytes(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      fail(path, static_cast<int64_t>(done), "cannot read " + what_file + ": " + std::strerror(n == 0 ? EIO : err));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return bytes;
}

// Megatron's dtype codes (indexed_dataset.py, DType).
bool megatron_dtype(int code, TokenDtype& out) {
  switch (code) {
    case 1:
      out = {1, false};
      return true;
    case 2:
      out = {1, true};
      return true;
    case 3:
      out = {2, true};
      return true;
    case 4:
      out = {4, true};
      return true;
    case 5:
      out = {8, true};
      return true;
    case 8:
      out = {2, false};
      return true;
    default:
      return false;
  }
}

}  // namespace

std::string TokenDtype::name() const { return (is_signed ? "int" : "uint") + std::to_string(width * 8); }

// ---- MappedTokens ----

MappedTokens::MappedTokens(const std::string& path, int64_t data_offset, TokenDtype dtype, int64_t vocab,
                           const std::string& what_file)
    : path_(path), dtype_(dtype), data_offset_(data_offset) {
  file_ = map_token_file(path, what_file);
  const int64_t file_bytes = file_.size();
  const int64_t width = dtype.width;
  if (data_offset < 0 || data_offset > file_bytes) {
    fail(path, file_bytes,
         "truncated: " + file_size_text(file_bytes) + ", data starts at " + std::to_string(data_offset));
  }
  if ((file_bytes - data_offset) % width != 0) {
    fail(path, file_bytes - (file_bytes - data_offset) % width,
         file_size_text(file_bytes) + ": " + std::to_string(file_bytes - data_offset) +
             " bytes of tokens are not a whole number of " + dtype.name() + " tokens (" + std::to_string(width) +
             " bytes each)");
  }
  count_ = (file_bytes - data_offset) / width;
  // Every token id in [0, vocab): one linear scan, so training never indexes past the embedding table.
  for (int64_t i = 0; i < count_; ++i) {
    const int64_t t = load(i);
    if (t < 0 || t >= vocab) {
      const std::string id = dtype.is_signed ? std::to_string(t) : std::to_string(static_cast<uint64_t>(t));
      fail(path, data_offset + i * width,
           "token id " + id + (t < 0 ? " < 0" : " >= vocab " + std::to_string(vocab)) + " (token " + std::to_string(i) +
               ")");
    }
  }
}

int64_t MappedTokens::load(int64_t i) const {
  const unsigned char* p = file_.data() + data_offset_ + i * dtype_.width;
  if (dtype_.width == 2 && !dtype_.is_signed) return int64_t(uint32_t(p[0]) | uint32_t(p[1]) << 8);
  if (dtype_.is_signed) return load_signed(p, dtype_.width);
  return static_cast<int64_t>(load_le(p, dtype_.width));
}

int64_t MappedTokens::token(int64_t i) const {
  if (i < 0 || i >= count_) {
    throw DataError(path_ + ": token index " + std::to_string(i) + " out of range [0, " + std::to_string(count_) + ")");
  }
  return load(i);
}

void MappedTokens::read(int64_t begin, int64_t count, int64_t* out) const {
  if (begin < 0 || count < 0 || begin > count_ || count > count_ - begin) {
    throw DataError(path_ + ": token range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                    ") out of range [0, " + std::to_string(count_) + ")");
  }
  for (int64_t i = 0; i < count; ++i) out[i] = load(begin + i);
}

// ---- Megatron ----

MegatronIndex parse_megatron_index(const std::string& path, const unsigned char* bytes, size_t size,
                                   int64_t bin_bytes) {
  const auto file_bytes = static_cast<int64_t>(size);
  if (file_bytes < kMegatronHeaderBytes) {
    fail(path, file_bytes,
         "truncated: " + file_size_text(file_bytes) + ", shorter than the " + std::to_string(kMegatronHeaderBytes) +
             "-byte Megatron index header");
  }
  if (std::memcmp(bytes, kMegatronMagic, 9) != 0) {
    fail(path, 0, "bad magic, expected \"MMIDIDX\\x00\\x00\" (not a Megatron-LM .idx file)");
  }
  const uint64_t version = load_le(bytes + 9, 8);
  if (version != 1) fail(path, 9, "unsupported version " + std::to_string(version) + " (this Keel reads version 1)");
  MegatronIndex index;
  index.dtype_code = bytes[17];
  if (index.dtype_code == 6 || index.dtype_code == 7) {
    fail(path, 17,
         "dtype code " + std::to_string(index.dtype_code) + " (" + (index.dtype_code == 6 ? "float64" : "float32") +
             ") holds no token ids (integer codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)");
  }
  if (!megatron_dtype(index.dtype_code, index.dtype)) {
    fail(path, 17,
         "unknown dtype code " + std::to_string(index.dtype_code) +
             " (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16; 6 and 7 are floats)");
  }
  const uint64_t s = load_le(bytes + 18, 8);
  const uint64_t d = load_le(bytes + 26, 8);
  // Expected size, without overflow: 34 + 12 S + 8 D.
  const uint64_t limit = static_cast<uint64_t>(file_bytes);
  if (s > limit / 12 || d > limit / 8 || kMegatronHeaderBytes + 12 * s + 8 * d != limit) {
    const bool small = s <= limit / 12 && d <= limit / 8 && kMegatronHeaderBytes + 12 * s + 8 * d > limit;
    fail(path, (s > limit / 12 || d > limit / 8 || small) ? 18 : file_bytes,
         std::string(s > limit / 12 || d > limit / 8 || small ? "truncated" : "trailing bytes") + ": " +
             file_size_text(file_bytes) + ", header says " + std::to_string(s) + " sequences and " + std::to_string(d) +
             " document indices = 34 + 12 x " + std::to_string(s) + " + 8 x " + std::to_string(d) + " bytes");
  }
  index.sequences = static_cast<int64_t>(s);
  const int64_t width = index.dtype.width;
  const int64_t lengths_at = kMegatronHeaderBytes;
  const int64_t pointers_at = lengths_at + 4 * index.sequences;
  const int64_t documents_at = pointers_at + 8 * index.sequences;
  std::vector<int64_t> seq_start(static_cast<size_t>(index.sequences) + 1, 0);  // token offset of each sequence
  int64_t expected_pointer = 0;
  for (int64_t k = 0; k < index.sequences; ++k) {
    const int64_t length = load_signed(bytes + lengths_at + 4 * k, 4);
    if (length < 0) fail(path, lengths_at + 4 * k, "sequence " + std::to_string(k) + " has negative length");
    const int64_t pointer = load_signed(bytes + pointers_at + 8 * k, 8);
    if (pointer != expected_pointer) {
      fail(path, pointers_at + 8 * k,
           "sequence " + std::to_string(k) + " starts at byte " + std::to_string(pointer) + " of the .bin, expected " +
               std::to_string(expected_pointer) + " (sequences back to back: the previous pointer + length x " +
               std::to_string(width) + ")");
    }
    if (length > (bin_bytes - pointer) / width) {
      fail(path, lengths_at + 4 * k,
           "sequence " + std::to_string(k) + " (" + std::to_string(length) + " tokens from byte " +
               std::to_string(pointer) + ") runs past the end of the .bin (" + std::to_string(bin_bytes) + " bytes)");
    }
    expected_pointer = pointer + length * width;
    seq_start[static_cast<size_t>(k) + 1] = seq_start[static_cast<size_t>(k)] + length;
  }
  if (expected_pointer != bin_bytes) {
    fail(path, pointers_at,
         "the sequences cover " + std::to_string(expected_pointer) + " bytes of the .bin, which has " +
             std::to_string(bin_bytes) + " (trailing bytes)");
  }
  index.tokens = seq_start.back();
  const auto documents = static_cast<int64_t>(d);
  if (documents < 1) fail(path, 26, "document_count 0: the document index needs at least the leading 0");
  int64_t previous = -1;
  for (int64_t k = 0; k < documents; ++k) {
    const int64_t at = documents_at + 8 * k;
    const int64_t v = load_signed(bytes + at, 8);
    const bool first = k == 0, last = k == documents - 1;
    if ((first && v != 0) || (last && v != index.sequences) || v < 0 || v > index.sequences || v <= previous) {
      fail(path, at,
           "document index " + std::to_string(k) + " = " + std::to_string(v) + ": expected " +
               (first  ? std::string("0")
                : last ? std::to_string(index.sequences) + " (the sequence count)"
                       : "a sequence index above " + std::to_string(previous)) +
               " (document indices start at 0, ascend strictly and end at the sequence count)");
    }
    if (!last) {
      if (k > 0 && seq_start[static_cast<size_t>(v)] == index.document_starts.back()) {
        fail(path, at - 8,
             "document " + std::to_string(k - 1) + " has no tokens (Keel needs every document non-empty)");
      }
      index.document_starts.push_back(seq_start[static_cast<size_t>(v)]);
    } else if (k > 0 && index.tokens == index.document_starts.back()) {
      fail(path, at - 8, "document " + std::to_string(k - 1) + " has no tokens (Keel needs every document non-empty)");
    }
    previous = v;
  }
  return index;
}

std::string megatron_prefix(const std::string& input) {
  for (const char* ext : {".bin", ".idx"}) {
    if (input.size() > 4 && input.compare(input.size() - 4, 4, ext) == 0) return input.substr(0, input.size() - 4);
  }
  return input;
}

MegatronDataset open_megatron(const std::string& input, int64_t vocab) {
  const std::string prefix = megatron_prefix(input);
  const std::string idx_path = prefix + ".idx", bin_path = prefix + ".bin";
  int64_t bin_bytes = 0;
  ::close(open_regular(bin_path, "a Megatron .bin file", bin_bytes));
  const std::string idx = read_whole(idx_path, "a Megatron .idx file");
  MegatronIndex index =
      parse_megatron_index(idx_path, reinterpret_cast<const unsigned char*>(idx.data()), idx.size(), bin_bytes);
  MappedTokens tokens(bin_path, 0, index.dtype, vocab, "a Megatron .bin file");
  if (tokens.num_tokens() != index.tokens) {  // the .bin changed between the two opens
    fail(bin_path, tokens.file_bytes(),
         "has " + std::to_string(tokens.num_tokens()) + " tokens, " + idx_path + " says " +
             std::to_string(index.tokens));
  }
  return {std::move(index), std::move(tokens)};
}

// ---- NumPy ----

NpyHeader parse_npy_header(const std::string& path, const unsigned char* bytes, size_t size) {
  io::NpyHeader npy;
  try {
    npy = io::parse_npy_header(path, bytes, size);
  } catch (const io::FileError& e) {
    throw DataError(e.what());
  }
  const int64_t dict_at = bytes[6] == 1 ? 10 : 12;  // where the header's dict starts (version 1.0, else 2.0/3.0)
  if (npy.big_endian) fail(path, dict_at, "dtype '" + npy.descr + "' is big-endian (Keel reads little-endian)");
  if (npy.shape.size() != 1) {
    fail(path, dict_at, "'shape' is not one-dimensional (N,) in the .npy header: " + npy.shape_text());
  }
  NpyHeader h;
  h.dtype = {npy.width, npy.is_signed};
  h.count = npy.shape[0];
  h.data_offset = npy.data_offset;
  return h;
}

bool is_npy_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[6] = {};
  f.read(magic, 6);
  return f.gcount() == 6 && std::memcmp(magic, kNpyMagic, 6) == 0;
}

MappedTokens open_npy(const std::string& path, int64_t vocab) {
  int64_t size = 0;
  const int fd = open_regular(path, "an .npy file", size);
  std::string head(static_cast<size_t>(std::min<int64_t>(size, 1 << 16)), '\0');
  const ssize_t got = ::pread(fd, head.data(), head.size(), 0);
  ::close(fd);
  if (got < 0) fail(path, 0, std::string("cannot read .npy header: ") + std::strerror(errno));
  head.resize(static_cast<size_t>(got));
  const NpyHeader h = parse_npy_header(path, reinterpret_cast<const unsigned char*>(head.data()), head.size());
  const int64_t room = (size - h.data_offset) / h.dtype.width;  // data_offset <= size (parse_npy_header)
  if (h.count != room || (size - h.data_offset) % h.dtype.width != 0) {
    const bool truncated = h.count > room;
    fail(path, size,
         std::string(truncated ? "truncated" : "trailing bytes") + ": " + file_size_text(size) +
             ", the header's shape (" + std::to_string(h.count) + ",) of " + h.dtype.name() + " needs " +
             (truncated && h.count > INT64_MAX / 8 ? std::string("more")
                                                   : std::to_string(h.data_offset + h.count * h.dtype.width)));
  }
  return MappedTokens(path, h.data_offset, h.dtype, vocab, "an .npy file");
}

MappedTokens open_raw_tokens(const std::string& path, const std::string& dtype, int64_t vocab) {
  TokenDtype t;
  if (dtype == "uint16") {
    t = {2, false};
  } else if (dtype == "uint32") {
    t = {4, false};
  } else {
    throw DataError(path + ": raw token file needs dtype uint16 or uint32, got '" + dtype + "'");
  }
  return MappedTokens(path, 0, t, vocab, "a raw " + dtype + " token file");
}

void append_eos_document_starts(const TokenStream& tokens, int64_t eos_id, int64_t stream_offset,
                                std::vector<int64_t>& starts) {
  const int64_t n = tokens.num_tokens();
  if (n > 0 && starts.empty()) starts.push_back(stream_offset);
  std::vector<int64_t> block(static_cast<size_t>(std::min<int64_t>(n, int64_t(1) << 16)));
  for (int64_t begin = 0; begin < n; begin += static_cast<int64_t>(block.size())) {
    const int64_t count = std::min<int64_t>(static_cast<int64_t>(block.size()), n - begin);
    tokens.read(begin, count, block.data());
    for (int64_t i = 0; i < count; ++i) {
      if (block[static_cast<size_t>(i)] == eos_id) starts.push_back(stream_offset + begin + i + 1);
    }
  }
}

// ---- JSON lines ----

std::vector<int32_t> parse_jsonl_tokens(const std::string& path, const std::string& text, int64_t vocab) {
  std::vector<int32_t> tokens;
  size_t pos = 0;
  for (int64_t line_no = 1; pos < text.size(); ++line_no) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = path + ": line " + std::to_string(line_no) + ": ";
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw DataError(where + "not JSON (" + e.what() + ")");
    }
    if (!j.is_object() || !j.contains("token_ids") || !j["token_ids"].is_array()) {
      throw DataError(where + "no \"token_ids\" array (each line is an object like {\"token_ids\": [1, 2, 3]})");
    }
    const auto& ids = j["token_ids"];
    for (size_t k = 0; k < ids.size(); ++k) {
      const auto& v = ids[k];
      if (!v.is_number_integer()) {
        throw DataError(where + "token_ids[" + std::to_string(k) + "] = " + v.dump() + " is not an integer");
      }
      const int64_t t =
          v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
      if (t < 0 || t >= vocab) {
        throw DataError(where + "token_ids[" + std::to_string(k) + "] = " + v.dump() +
                        (t < 0 ? " < 0" : " >= vocab " + std::to_string(vocab)));
      }
      tokens.push_back(static_cast<int32_t>(t));
    }
  }
  return tokens;
}

namespace {

// The decompressed bytes of a gzip file, through `gzip -dc` (no shell; a FIFO is refused before it is opened).
std::string gunzip(const std::string& path) {
  io::require_regular_file<DataError>(path, "a .gz file");
  int fds[2];
  if (::pipe(fds) != 0) throw DataError(path + ": cannot start gzip: " + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw DataError(path + ": cannot start gzip: " + std::strerror(errno));
  }
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    ::execlp("gzip", "gzip", "-dc", "--", path.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw DataError(path + ": gzip -dc failed (exit " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) +
                    "): not a valid gzip file, or gzip is not installed");
  }
  return out;
}

}  // namespace

std::vector<int32_t> read_jsonl_tokens(const std::string& path, int64_t vocab) {
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  return parse_jsonl_tokens(path, gz ? gunzip(path) : read_whole(path, "a JSON lines file"), vocab);
}

}  // namespace keel::data

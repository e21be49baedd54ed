// Why: the one place that knows the shard byte layout (see shard.h and docs/data.md). Integers are assembled
// byte by byte so the format is little-endian on any host; the compiler turns this into plain loads on x86/ARM.
#include "core/data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "core/data/regular_file.h"

namespace keel::data {
namespace {

uint32_t load_u32(const unsigned char* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
uint64_t load_u64(const unsigned char* p) { return uint64_t(load_u32(p)) | uint64_t(load_u32(p + 4)) << 32; }
void store_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void store_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

[[noreturn]] void fail(const std::string& path, int64_t offset, const std::string& what) {
  throw DataError(path + ": offset " + std::to_string(offset) + ": " + what);
}

}  // namespace

int64_t write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size, int64_t eos_id) {
  if (vocab_size <= 0 || vocab_size > (int64_t(1) << 32) - 1) {
    throw DataError(path + ": cannot write shard: vocab_size " + std::to_string(vocab_size) + " out of range");
  }
  if (eos_id < 0 || eos_id >= vocab_size) {
    throw DataError(path + ": cannot write shard: eos_id " + std::to_string(eos_id) + " >= vocab " +
                    std::to_string(vocab_size));
  }
  ShardHeader header;
  header.dtype = vocab_size <= 65536 ? kShardDtypeU16 : kShardDtypeU32;
  header.vocab_size = static_cast<uint32_t>(vocab_size);
  header.eos_id = static_cast<uint32_t>(eos_id);
  header.num_tokens = tokens.size();
  const int64_t width = header.token_bytes();

  std::vector<unsigned char> bytes(kShardHeaderBytes + tokens.size() * width);
  std::memcpy(bytes.data(), kShardMagic, 8);
  store_u32(bytes.data() + 8, header.version);
  store_u32(bytes.data() + 12, header.dtype);
  store_u32(bytes.data() + 16, header.vocab_size);
  store_u32(bytes.data() + 20, header.eos_id);
  store_u64(bytes.data() + 24, header.num_tokens);
  unsigned char* out = bytes.data() + kShardHeaderBytes;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t t = tokens[i];
    if (t < 0 || t >= vocab_size) {
      throw DataError(path + ": cannot write shard: token " + std::to_string(i) + " is " + std::to_string(t) +
                      ", outside [0, " + std::to_string(vocab_size) + ")");
    }
    const auto v = static_cast<uint32_t>(t);
    out[i * width] = static_cast<unsigned char>(v);
    out[i * width + 1] = static_cast<unsigned char>(v >> 8);
    if (width == 4) {
      out[i * width + 2] = static_cast<unsigned char>(v >> 16);
      out[i * width + 3] = static_cast<unsigned char>(v >> 24);
    }
  }

  // Something other than a file in the shard's place (or its temp file's) was not written by Keel: refuse to
  // replace it (rename would swap out a FIFO silently and fail on a directory).
  const std::string tmp = path + ".tmp";
  for (const std::string& p : {path, tmp}) {
    struct stat st {};
    if (::lstat(p.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
      throw DataError(p + ": is " + non_regular_kind(st.st_mode) +
                      ", not a shard file: Keel does not replace it; move it away and prepare again");
    }
  }
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw DataError(tmp + ": cannot open for writing: " + std::strerror(errno));
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    if (!f) throw DataError(tmp + ": write failed: " + std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw DataError(path + ": cannot rename " + tmp + ": " + ec.message());
  return static_cast<int64_t>(bytes.size());
}

ShardReader open_prepared_shard(const std::string& path, int64_t vocab, int64_t tokens, int64_t eos_id) {
  ShardReader reader(path, vocab);
  if (reader.num_tokens() != tokens) {
    fail(path, 24,
         "shard has " + std::to_string(reader.num_tokens()) + " tokens, prepared.json says " + std::to_string(tokens));
  }
  if (reader.eos_id() != eos_id) {
    fail(path, 20, "eos_id " + std::to_string(reader.eos_id()) + " != prepared.json eos_id " + std::to_string(eos_id));
  }
  return reader;
}

ShardReader::ShardReader(const std::string& path, int64_t expected_vocab) : path_(path) {
  // O_NONBLOCK: a FIFO in a shard's place must be refused, not waited on (the flag means nothing for a file).
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    require_regular_file<DataError>(path, "a shard file");  // a socket cannot be opened: say what it is
    fail(path, 0, std::string("cannot open shard: ") + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, 0, std::string("cannot stat shard: ") + std::strerror(err));
  }
  if (const std::string kind = non_regular_kind(st.st_mode); !kind.empty()) {
    ::close(fd);
    throw DataError(path + ": is " + kind + ", not a shard file");
  }
  file_bytes_ = st.st_size;
  if (file_bytes_ < kShardHeaderBytes) {
    ::close(fd);
    fail(path, file_bytes_,
         "truncated: file is " + std::to_string(file_bytes_) + " bytes, shorter than the " +
             std::to_string(kShardHeaderBytes) + "-byte header");
  }
  void* map = ::mmap(nullptr, static_cast<size_t>(file_bytes_), PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) fail(path, 0, std::string("cannot mmap shard: ") + std::strerror(map_err));
  map_ = static_cast<const unsigned char*>(map);
  map_bytes_ = static_cast<size_t>(file_bytes_);

  try {
    if (std::memcmp(map_, kShardMagic, 8) != 0) {
      std::string got;
      for (int i = 0; i < 8; ++i) {
        const unsigned char c = map_[i];
        if (c >= 32 && c < 127) {
          got += static_cast<char>(c);
        } else {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          got += buf;
        }
      }
      fail(path, 0, "bad magic \"" + got + "\", expected \"KEELTOK1\" (not a Keel token shard)");
    }
    header_.version = load_u32(map_ + 8);
    if (header_.version != kShardVersion) {
      fail(path, 8,
           "unsupported version " + std::to_string(header_.version) + " (this Keel reads version " +
               std::to_string(kShardVersion) + ")");
    }
    header_.dtype = load_u32(map_ + 12);
    if (header_.dtype != kShardDtypeU16 && header_.dtype != kShardDtypeU32) {
      fail(path, 12, "unknown dtype " + std::to_string(header_.dtype) + " (1 = uint16, 2 = uint32)");
    }
    header_.vocab_size = load_u32(map_ + 16);
    if (expected_vocab != kAnyVocab && static_cast<int64_t>(header_.vocab_size) != expected_vocab) {
      fail(path, 16,
           "vocab_size " + std::to_string(header_.vocab_size) + " != expected vocab " + std::to_string(expected_vocab) +
               " (shard prepared for another model.vocab?)");
    }
    if (header_.dtype == kShardDtypeU16 && header_.vocab_size > 65536) {
      fail(path, 16, "vocab_size " + std::to_string(header_.vocab_size) + " does not fit dtype 1 (uint16)");
    }
    header_.eos_id = load_u32(map_ + 20);
    if (header_.eos_id >= header_.vocab_size) {
      fail(path, 20, "eos_id " + std::to_string(header_.eos_id) + " >= vocab " + std::to_string(header_.vocab_size));
    }
    header_.num_tokens = load_u64(map_ + 24);
    const int64_t width = header_.token_bytes();
    const uint64_t max_tokens = static_cast<uint64_t>(INT64_MAX - kShardHeaderBytes) / width;
    const uint64_t expected_bytes = header_.num_tokens > max_tokens
                                        ? UINT64_MAX
                                        : kShardHeaderBytes + header_.num_tokens * static_cast<uint64_t>(width);
    if (expected_bytes != static_cast<uint64_t>(file_bytes_)) {
      std::ostringstream what;
      what << (static_cast<uint64_t>(file_bytes_) < expected_bytes ? "truncated" : "trailing bytes") << ": file is "
           << file_bytes_ << " bytes, header says " << header_.num_tokens << " tokens of " << width
           << " bytes = " << (expected_bytes == UINT64_MAX ? std::string("overflow") : std::to_string(expected_bytes))
           << " bytes";
      fail(path, std::min<int64_t>(file_bytes_, expected_bytes == UINT64_MAX ? 24 : expected_bytes), what.str());
    }
    // Every token id < vocab_size: one linear scan (~10 ms per 16M tokens), so training never indexes past
    // the embedding table.
    const unsigned char* p = map_ + kShardHeaderBytes;
    const uint32_t vocab = header_.vocab_size;
    const uint64_t n = header_.num_tokens;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t t = width == 2 ? (uint32_t(p[2 * i]) | uint32_t(p[2 * i + 1]) << 8) : load_u32(p + 4 * i);
      if (t >= vocab) {
        fail(path, kShardHeaderBytes + static_cast<int64_t>(i) * width,
             "token id " + std::to_string(t) + " >= vocab " + std::to_string(vocab) + " (token " + std::to_string(i) +
                 ")");
      }
    }
  } catch (...) {
    close();
    throw;
  }
}

ShardReader::~ShardReader() { close(); }

ShardReader::ShardReader(ShardReader&& other) noexcept
    : path_(std::move(other.path_)),
      header_(other.header_),
      file_bytes_(other.file_bytes_),
      map_(std::exchange(other.map_, nullptr)),
      map_bytes_(std::exchange(other.map_bytes_, 0)) {}

ShardReader& ShardReader::operator=(ShardReader&& other) noexcept {
  if (this != &other) {
    close();
    path_ = std::move(other.path_);
    header_ = other.header_;
    file_bytes_ = other.file_bytes_;
    map_ = std::exchange(other.map_, nullptr);
    map_bytes_ = std::exchange(other.map_bytes_, 0);
  }
  return *this;
}

void ShardReader::close() {
  if (map_ != nullptr) ::munmap(const_cast<unsigned char*>(map_), map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

int32_t ShardReader::token(int64_t i) const {
  if (i < 0 || i >= num_tokens()) {
    throw DataError(path_ + ": token index " + std::to_string(i) + " out of range [0, " + std::to_string(num_tokens()) +
                    ")");
  }
  const unsigned char* p = map_ + kShardHeaderBytes;
  if (header_.dtype == kShardDtypeU16) return static_cast<int32_t>(uint32_t(p[2 * i]) | uint32_t(p[2 * i + 1]) << 8);
  return static_cast<int32_t>(load_u32(p + 4 * i));
}

void ShardReader::read(int64_t begin, int64_t count, int64_t* out) const {
  if (begin < 0 || count < 0 || begin + count > num_tokens()) {
    throw DataError(path_ + ": token range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                    ") out of range [0, " + std::to_string(num_tokens()) + ")");
  }
  const unsigned char* p = map_ + kShardHeaderBytes;
  if (header_.dtype == kShardDtypeU16) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = begin + i;
      out[i] = int64_t(uint32_t(p[2 * j]) | uint32_t(p[2 * j + 1]) << 8);
    }
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = int64_t(load_u32(p + 4 * (begin + i)));
  }
}

std::vector<int32_t> ShardReader::read_all() const {
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens()));
  for (int64_t i = 0; i < num_tokens(); ++i) tokens[i] = token(i);
  return tokens;
}

}  // namespace keel::data

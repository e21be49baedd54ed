// Why: the one place that knows the shard byte layout (see shard.h and docs/data.md). Integers are assembled
// byte by byte so the format is little-endian on any host; the compiler turns this into plain loads on x86/ARM.
#include "core/data/shard.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string_view>

#include "core/io/file.h"
#include "core/io/regular_file.h"

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

  // Something other than a file in the shard's place was not written by Keel: refuse to replace it (rename
  // would swap out a FIFO silently and fail on a directory).
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
    throw DataError(path + ": is " + io::non_regular_kind(st.st_mode) +
                    ", not a shard file: Keel does not replace it; move it away and prepare again");
  }
  try {
    io::write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  } catch (const io::FileError& e) {
    throw DataError(std::string(e.what()) + " (writing a shard)");
  }
  return static_cast<int64_t>(bytes.size());
}

io::MappedFile map_token_file(const std::string& path, const std::string& noun) {
  try {
    return io::MappedFile(path, noun);
  } catch (const io::FileError& e) {
    if (e.reason().rfind("is ", 0) == 0) throw DataError(e.what());  // what the path is: no byte offset
    fail(path, 0, e.reason());
  }
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
  file_ = map_token_file(path, "a shard file");
  const int64_t file_bytes = file_.size();
  if (file_bytes < kShardHeaderBytes) {
    fail(path, file_bytes,
         "truncated: file is " + std::to_string(file_bytes) + " bytes, shorter than the " +
             std::to_string(kShardHeaderBytes) + "-byte header");
  }
  const unsigned char* map = file_.data();

  {
    if (std::memcmp(map, kShardMagic, 8) != 0) {
      std::string got;
      for (int i = 0; i < 8; ++i) {
        const unsigned char c = map[i];
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
    header_.version = load_u32(map + 8);
    if (header_.version != kShardVersion) {
      fail(path, 8,
           "unsupported version " + std::to_string(header_.version) + " (this Keel reads version " +
               std::to_string(kShardVersion) + ")");
    }
    header_.dtype = load_u32(map + 12);
    if (header_.dtype != kShardDtypeU16 && header_.dtype != kShardDtypeU32) {
      fail(path, 12, "unknown dtype " + std::to_string(header_.dtype) + " (1 = uint16, 2 = uint32)");
    }
    header_.vocab_size = load_u32(map + 16);
    if (expected_vocab != kAnyVocab && static_cast<int64_t>(header_.vocab_size) != expected_vocab) {
      fail(path, 16,
           "vocab_size " + std::to_string(header_.vocab_size) + " != expected vocab " + std::to_string(expected_vocab) +
               " (shard prepared for another model.vocab?)");
    }
    if (header_.dtype == kShardDtypeU16 && header_.vocab_size > 65536) {
      fail(path, 16, "vocab_size " + std::to_string(header_.vocab_size) + " does not fit dtype 1 (uint16)");
    }
    header_.eos_id = load_u32(map + 20);
    if (header_.eos_id >= header_.vocab_size) {
      fail(path, 20, "eos_id " + std::to_string(header_.eos_id) + " >= vocab " + std::to_string(header_.vocab_size));
    }
    header_.num_tokens = load_u64(map + 24);
    const int64_t width = header_.token_bytes();
    const uint64_t max_tokens = static_cast<uint64_t>(INT64_MAX - kShardHeaderBytes) / width;
    const uint64_t expected_bytes = header_.num_tokens > max_tokens
                                        ? UINT64_MAX
                                        : kShardHeaderBytes + header_.num_tokens * static_cast<uint64_t>(width);
    if (expected_bytes != static_cast<uint64_t>(file_bytes)) {
      std::ostringstream what;
      what << (static_cast<uint64_t>(file_bytes) < expected_bytes ? "truncated" : "trailing bytes") << ": file is "
           << file_bytes << " bytes, header says " << header_.num_tokens << " tokens of " << width
           << " bytes = " << (expected_bytes == UINT64_MAX ? std::string("overflow") : std::to_string(expected_bytes))
           << " bytes";
      fail(path, std::min<int64_t>(file_bytes, expected_bytes == UINT64_MAX ? 24 : expected_bytes), what.str());
    }
    // Every token id < vocab_size: one linear scan (~10 ms per 16M tokens), so training never indexes past
    // the embedding table.
    const unsigned char* p = map + kShardHeaderBytes;
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
  }
}

int32_t ShardReader::token(int64_t i) const {
  if (i < 0 || i >= num_tokens()) {
    throw DataError(path_ + ": token index " + std::to_string(i) + " out of range [0, " + std::to_string(num_tokens()) +
                    ")");
  }
  const unsigned char* p = file_.data() + kShardHeaderBytes;
  if (header_.dtype == kShardDtypeU16) return static_cast<int32_t>(uint32_t(p[2 * i]) | uint32_t(p[2 * i + 1]) << 8);
  return static_cast<int32_t>(load_u32(p + 4 * i));
}

void ShardReader::read(int64_t begin, int64_t count, int64_t* out) const {
  if (begin < 0 || count < 0 || begin + count > num_tokens()) {
    throw DataError(path_ + ": token range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                    ") out of range [0, " + std::to_string(num_tokens()) + ")");
  }
  const unsigned char* p = file_.data() + kShardHeaderBytes;
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

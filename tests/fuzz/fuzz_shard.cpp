// Why: token shards are files from outside the process — prepared on another machine, copied, truncated by a
// full disk, or simply not Keel shards — and ShardReader promises to validate everything at open time so that
// training never reads past the mapping or indexes past the embedding table. This target hands ShardReader
// arbitrary bytes through the real open/fstat/mmap path (an in-memory file, /proc/self/fd/N) and checks:
//   - any input either opens or throws DataError (never a crash, a sanitizer report or another exception);
//   - a shard that opens keeps its promises: size == 32 + num_tokens * width, eos_id < vocab, every token
//     < vocab through token(), read() and read_all(), out-of-range reads throw DataError, a wrong expected
//     vocab is refused;
//   - write_shard(read_all()) writes a shard that reads back to the same tokens.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "core/data/data_error.h"
#include "core/data/shard.h"

namespace {

using keel::data::DataError;
using keel::data::ShardReader;

[[noreturn]] void broken_promise(const char* what) {
  std::fprintf(stderr, "fuzz_shard: %s\n", what);
  std::abort();
}

template <typename Fn>
void expect_data_error(Fn&& fn, const char* what) {
  try {
    fn();
  } catch (const DataError&) {
    return;
  }
  broken_promise(what);
}

// One in-memory file, rewritten for every input; ShardReader opens it by path like any shard.
struct InputFile {
  int fd = -1;
  std::string path;
  std::string scratch_dir;  // for write_shard round trips (it writes PATH.tmp, then renames)
  InputFile() {
    fd = ::memfd_create("keel-fuzz-shard", MFD_CLOEXEC);
    if (fd < 0) broken_promise("memfd_create failed");
    path = "/proc/self/fd/" + std::to_string(fd);
    std::string templ = (std::filesystem::temp_directory_path() / "keel-fuzz-shard-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) broken_promise("mkdtemp failed");
    scratch_dir = templ;
  }
  void write(const uint8_t* data, size_t size) {
    if (::ftruncate(fd, 0) != 0) broken_promise("ftruncate failed");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
      if (n <= 0) broken_promise("pwrite failed");
      done += static_cast<size_t>(n);
    }
  }
};

void check_open_shard(const ShardReader& shard, const InputFile& file, size_t size) {
  const auto& h = shard.header();
  const int64_t n = shard.num_tokens();
  const int64_t width = h.token_bytes();
  if (n < 0 || shard.file_bytes() != static_cast<int64_t>(size) ||
      static_cast<int64_t>(size) != keel::data::kShardHeaderBytes + n * width)
    broken_promise("opened a shard whose size does not match its header");
  if (h.eos_id >= h.vocab_size) broken_promise("opened a shard with eos_id >= vocab");

  const std::vector<int32_t> all = shard.read_all();
  if (static_cast<int64_t>(all.size()) != n) broken_promise("read_all returned the wrong count");
  std::vector<int64_t> window(static_cast<size_t>(n));
  shard.read(0, n, window.data());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = static_cast<uint32_t>(all[i]);
    if (t >= shard.vocab_size() || window[i] != t || shard.token(i) != all[i])
      broken_promise("token out of vocab, or read/token/read_all disagree");
  }
  int64_t dummy = 0;
  expect_data_error([&] { shard.token(-1); }, "token(-1) did not throw DataError");
  expect_data_error([&] { shard.token(n); }, "token(num_tokens) did not throw DataError");
  expect_data_error([&] { shard.read(n, 1, &dummy); }, "read past the end did not throw DataError");
  expect_data_error([&] { shard.read(-1, 1, &dummy); }, "read(-1, 1) did not throw DataError");
  expect_data_error([&] { ShardReader(file.path, shard.vocab_size() + 1); }, "wrong expected vocab was accepted");

  // Round trip through the writer (it may pick another dtype; the tokens must survive). Token ids travel as
  // int32, so this holds for vocabularies up to 2^31 - 1 (a u32 shard may declare more; no model has that).
  if (shard.vocab_size() > INT32_MAX) return;
  const std::string copy = file.scratch_dir + "/copy.tok";
  try {
    keel::data::write_shard(copy, all, shard.vocab_size(), shard.eos_id());
    const ShardReader again(copy, shard.vocab_size());
    if (again.read_all() != all || again.eos_id() != shard.eos_id())
      broken_promise("write_shard(read_all()) does not read back the same tokens");
  } catch (const DataError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    broken_promise("write_shard refused the tokens of a valid shard, or its output does not open");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static InputFile file;
  file.write(data, size);
  try {
    const ShardReader shard(file.path, keel::data::kAnyVocab);
    check_open_shard(shard, file, size);
  } catch (const DataError&) {
    // the documented way to refuse a shard
  }
  return 0;
}

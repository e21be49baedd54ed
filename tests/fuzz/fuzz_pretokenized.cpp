// Why: a Megatron .idx and an .npy header come from other tools (preprocess_data.py, numpy, a half-finished copy)
// and their parsers turn counts and offsets from the file into array indices, so a wrong count must never read past
// the buffer. This target feeds parse_megatron_index and parse_npy_header arbitrary bytes and checks:
//   - any input either parses or throws DataError (never a crash, a sanitizer report or another exception);
//   - an .idx that parses keeps its promises: its sequences cover exactly the .bin's bytes (tokens x width), the
//     document starts begin at 0, ascend strictly and stay below the token count;
//   - an .npy header that parses has a 1, 2, 4 or 8-byte integer dtype and its data starts inside the header bytes.
//   - JSON lines (parse_jsonl_tokens) either parse to ids in [0, vocab) or throw DataError.
// Input: bytes starting with "{" are JSON lines; starting with "\x93NUMPY", an .npy file's first bytes; anything
// else is a u32 (little-endian) size of the .bin, then the .idx bytes. Seeds: make_pretokenized_seeds.py.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/data/data_error.h"
#include "core/data/pretokenized.h"

namespace {

[[noreturn]] void broken_promise(const char* what) {
  std::fprintf(stderr, "fuzz_pretokenized: %s\n", what);
  std::abort();
}

void check_megatron(const uint8_t* data, size_t size) {
  if (size < 4) return;
  const int64_t bin_bytes = int64_t(data[0]) | int64_t(data[1]) << 8 | int64_t(data[2]) << 16 | int64_t(data[3]) << 24;
  try {
    const keel::data::MegatronIndex index = keel::data::parse_megatron_index("fuzz.idx", data + 4, size - 4, bin_bytes);
    if (index.tokens < 0 || index.tokens * index.dtype.width != bin_bytes)
      broken_promise("sequences do not cover the .bin exactly");
    const auto& starts = index.document_starts;
    if (!starts.empty() && starts.front() != 0) broken_promise("first document does not start at 0");
    for (size_t i = 0; i < starts.size(); ++i) {
      if (starts[i] >= index.tokens || (i > 0 && starts[i] <= starts[i - 1]))
        broken_promise("document starts not ascending strictly below the token count");
    }
  } catch (const keel::data::DataError&) {
    // the documented way to refuse an index
  }
}

void check_npy(const uint8_t* data, size_t size) {
  try {
    const keel::data::NpyHeader h = keel::data::parse_npy_header("fuzz.npy", data, size);
    const int w = h.dtype.width;
    if (w != 1 && w != 2 && w != 4 && w != 8) broken_promise("npy header with a width other than 1, 2, 4, 8");
    if (h.data_offset < 10 || h.data_offset > static_cast<int64_t>(size) || h.count < 0)
      broken_promise("npy data offset outside the header bytes, or a negative count");
  } catch (const keel::data::DataError&) {
  }
}

// JSON lines: every id returned is in [0, vocab).
void check_jsonl(const uint8_t* data, size_t size) {
  try {
    const auto ids =
        keel::data::parse_jsonl_tokens("fuzz.jsonl", std::string(reinterpret_cast<const char*>(data), size), 50);
    for (int32_t t : ids)
      if (t < 0 || t >= 50) broken_promise("jsonl id outside [0, vocab)");
  } catch (const keel::data::DataError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size >= 1 && data[0] == '{') {
    check_jsonl(data, size);
  } else if (size >= 6 && std::memcmp(data, keel::data::kNpyMagic, 6) == 0) {
    check_npy(data, size);
  } else {
    check_megatron(data, size);
  }
  return 0;
}

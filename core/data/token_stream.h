// Why: a source's token stream is a list of files read in place — Keel's own KEELTOK1 shards, or token arrays
// written by other tools (Megatron-LM's .bin, OLMo's .npy, raw memmaps; pretokenized.h). The loader concatenates
// them and cuts samples out of the concatenation without caring which format each file has, so every reader
// offers this one interface: a token count and a copy of a token range widened to int64 (LibTorch's index type).
#pragma once

#include <cstdint>
#include <string>

namespace keel::data {

class TokenStream {
 public:
  virtual ~TokenStream() = default;
  virtual const std::string& path() const = 0;
  virtual int64_t num_tokens() const = 0;
  // Copy tokens [begin, begin + count) into out. Throws DataError when the range is outside [0, num_tokens()).
  virtual void read(int64_t begin, int64_t count, int64_t* out) const = 0;
};

}  // namespace keel::data

// Why: `keel score` answers "how likely does this checkpoint find these exact tokens?": the per-token
// log-probabilities and per-sequence NLL of given token rows (a 2-D integer .npy) or text (one sequence per line,
// tokenized with the checkpoint's own tokenizer), in fp32 under no_grad on one process, so that an outside
// implementation (HF transformers on an exported model, a hand computation) can be compared number for number.
// Shapes: a row of N tokens has N - 1 predicted tokens (token 0 has no context).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model/llama.h"

namespace keel::eval {

struct SequenceScore {
  int64_t tokens = 0;            // N, the row's length
  double nll = 0.0;              // mean of -log p(x_t | x_<t) over t = 1..N-1, nats
  std::vector<double> logprobs;  // log p(x_t | x_<t) for t = 1..N-1
};

// Every row scored in one fp32 forward each (rows of equal length are batched). Throws std::runtime_error naming
// the row for a row of fewer than 2 tokens, more than `max_tokens` (model.seq_len + 1), or an id outside
// [0, vocab).
std::vector<SequenceScore> score_rows(const model::Llama& model, const std::vector<std::vector<int64_t>>& rows,
                                      int64_t vocab, int64_t max_tokens);

// The rows of a 2-D integer NumPy array (.npy version 1-3, C order; dtypes i1/i2/i4/i8/u1/u2/u4/u8, either
// byte order). Throws std::runtime_error naming the file and what is wrong (magic, header, dtype, shape, size).
std::vector<std::vector<int64_t>> read_npy_rows(const std::string& path);

}  // namespace keel::eval

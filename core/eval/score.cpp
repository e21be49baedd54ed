// Why: see score.h.
#include "core/eval/score.h"

#include <torch/torch.h>

#include <cstring>
#include <map>
#include <stdexcept>

#include "core/io/file.h"
#include "core/io/npy.h"
#include "core/io/regular_file.h"

namespace keel::eval {

std::vector<SequenceScore> score_rows(const model::Llama& model, const std::vector<std::vector<int64_t>>& rows,
                                      int64_t vocab, int64_t max_tokens) {
  std::map<size_t, std::vector<size_t>> by_length;  // rows of one length go through one forward
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto& row = rows[r];
    const std::string name = "row " + std::to_string(r);
    if (row.size() < 2) throw std::runtime_error(name + ": " + std::to_string(row.size()) + " tokens, need at least 2");
    if (static_cast<int64_t>(row.size()) > max_tokens) {
      throw std::runtime_error(name + ": " + std::to_string(row.size()) + " tokens, the model takes at most " +
                               std::to_string(max_tokens) + " (model.seq_len + 1)");
    }
    for (size_t t = 0; t < row.size(); ++t) {
      if (row[t] < 0 || row[t] >= vocab) {
        throw std::runtime_error(name + ", token " + std::to_string(t) + ": id " + std::to_string(row[t]) +
                                 " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
      }
    }
    by_length[row.size()].push_back(r);
  }
  std::vector<SequenceScore> out(rows.size());
  torch::NoGradGuard no_grad;
  for (const auto& [length, indices] : by_length) {
    const int64_t n = static_cast<int64_t>(indices.size()), len = static_cast<int64_t>(length);
    torch::Tensor batch = torch::empty({n, len}, torch::kInt64);  // [B, N]
    for (int64_t i = 0; i < n; ++i) {
      const auto& row = rows[indices[static_cast<size_t>(i)]];
      std::memcpy(batch[i].data_ptr<int64_t>(), row.data(), row.size() * sizeof(int64_t));
    }
    const torch::Tensor inputs = batch.slice(1, 0, -1), targets = batch.slice(1, 1);           // [B, N-1]
    const torch::Tensor logits = model->forward(inputs, torch::kFloat32).to(torch::kFloat32);  // [B, N-1, V]
    const torch::Tensor logp = torch::log_softmax(logits, -1)
                                   .gather(-1, targets.unsqueeze(-1))  // [B, N-1, 1]
                                   .squeeze(-1)
                                   .contiguous();  // [B, N-1] fp32
    for (int64_t i = 0; i < n; ++i) {
      SequenceScore& s = out[indices[static_cast<size_t>(i)]];
      s.tokens = len;
      const float* p = logp[i].data_ptr<float>();
      s.logprobs.assign(p, p + (len - 1));
      double sum = 0.0;
      for (double v : s.logprobs) sum += v;
      s.nll = -sum / static_cast<double>(len - 1);
    }
  }
  return out;
}

std::vector<std::vector<int64_t>> read_npy_rows(const std::string& path) {
  const std::string bytes = io::read_regular_file<std::runtime_error>(path, "an .npy file");
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  io::NpyHeader h;
  try {
    h = io::parse_npy_header(path, data, bytes.size());
  } catch (const io::FileError& e) {
    throw std::runtime_error(e.what());
  }
  if (h.shape.size() != 2)
    throw std::runtime_error(path + ": shape " + h.shape_text() + ", expected a 2-D array (rows, tokens)");
  const auto rows = static_cast<size_t>(h.shape[0]), cols = static_cast<size_t>(h.shape[1]);
  const auto width = static_cast<size_t>(h.width);
  const size_t data_bytes = bytes.size() - static_cast<size_t>(h.data_offset);
  if (h.count() < 0 || (cols != 0 && rows > data_bytes / cols / width + 1))
    throw std::runtime_error(path + ": shape " + h.shape_text() + " does not fit the file");
  if (data_bytes != rows * cols * width) {
    throw std::runtime_error(path + ": " + std::to_string(data_bytes) + " data bytes, shape " + h.shape_text() +
                             " of '" + h.descr + "' needs " + std::to_string(rows * cols * width));
  }
  std::vector<std::vector<int64_t>> out(rows, std::vector<int64_t>(cols));
  const unsigned char* p = data + h.data_offset;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c, p += width) {
      uint64_t v = 0;
      for (size_t b = 0; b < width; ++b) v |= static_cast<uint64_t>(p[h.big_endian ? width - 1 - b : b]) << (8 * b);
      if (h.is_signed && width < 8 && (v >> (8 * width - 1)) != 0) v |= ~uint64_t{0} << (8 * width);  // sign-extend
      if (!h.is_signed && width == 8 && v > static_cast<uint64_t>(INT64_MAX))
        throw std::runtime_error(path + ": row " + std::to_string(r) + ", column " + std::to_string(c) +
                                 ": value beyond int64");
      out[r][c] = static_cast<int64_t>(v);
    }
  }
  return out;
}

}  // namespace keel::eval

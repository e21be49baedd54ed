// Why: see score.h.
#include "core/eval/score.h"

#include <torch/torch.h>

#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <stdexcept>

#include "core/data/regular_file.h"

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

namespace {

// The value of 'key' in a NumPy header dict ("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }").
std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  const std::regex pattern("'" + key + "'\\s*:\\s*('[^']*'|True|False|\\([^)]*\\))");
  std::smatch m;
  if (!std::regex_search(header, m, pattern)) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  return m[1].str();
}

}  // namespace

std::vector<std::vector<int64_t>> read_npy_rows(const std::string& path) {
  data::require_regular_file<std::runtime_error>(path);
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) throw std::runtime_error(path + ": read failed");
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0)
    throw std::runtime_error(path + ": not a .npy file (no \\x93NUMPY magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw std::runtime_error(path + ": truncated .npy header");
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    header_start = 12;
  } else {
    throw std::runtime_error(path + ": .npy version " + std::to_string(major) + " (reads 1, 2, 3)");
  }
  if (header_start + header_len > bytes.size())
    throw std::runtime_error(path + ": .npy header of " + std::to_string(header_len) + " bytes runs past the file");
  const std::string header = bytes.substr(header_start, header_len);
  const std::string descr = header_field(header, "descr", path);
  if (header_field(header, "fortran_order", path) != "False")
    throw std::runtime_error(path + ": fortran_order arrays are not read; save with C order");
  static const std::regex dtype_pattern("'([<>|])([iu])([1248])'");
  std::smatch d;
  if (!std::regex_match(descr, d, dtype_pattern))
    throw std::runtime_error(path + ": dtype " + descr + ", expected an integer dtype (i1..i8, u1..u8)");
  const bool big_endian = d[1].str() == ">", is_signed = d[2].str() == "i";
  const size_t width = static_cast<size_t>(std::stoi(d[3].str()));
  const std::string shape_text = header_field(header, "shape", path);
  static const std::regex shape_pattern("\\(\\s*(\\d+)\\s*,\\s*(\\d+)\\s*,?\\s*\\)");
  std::smatch s;
  if (!std::regex_match(shape_text, s, shape_pattern))
    throw std::runtime_error(path + ": shape " + shape_text + ", expected a 2-D array (rows, tokens)");
  const size_t rows = std::stoull(s[1].str()), cols = std::stoull(s[2].str());
  const size_t data_start = header_start + header_len;
  if (cols != 0 && rows > (bytes.size() - data_start) / cols / width + 1)
    throw std::runtime_error(path + ": shape " + shape_text + " does not fit the file");
  if (bytes.size() - data_start != rows * cols * width) {
    throw std::runtime_error(path + ": " + std::to_string(bytes.size() - data_start) + " data bytes, shape " +
                             shape_text + " of " + descr + " needs " + std::to_string(rows * cols * width));
  }
  std::vector<std::vector<int64_t>> out(rows, std::vector<int64_t>(cols));
  const unsigned char* p = reinterpret_cast<const unsigned char*>(bytes.data()) + data_start;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c, p += width) {
      uint64_t v = 0;
      for (size_t b = 0; b < width; ++b) v |= static_cast<uint64_t>(p[big_endian ? width - 1 - b : b]) << (8 * b);
      if (is_signed && width < 8 && (v >> (8 * width - 1)) != 0) v |= ~uint64_t{0} << (8 * width);  // sign-extend
      if (!is_signed && width == 8 && v > static_cast<uint64_t>(INT64_MAX))
        throw std::runtime_error(path + ": row " + std::to_string(r) + ", column " + std::to_string(c) +
                                 ": value beyond int64");
      out[r][c] = static_cast<int64_t>(v);
    }
  }
  return out;
}

}  // namespace keel::eval

// Why: `keel score` is what outside checks compare against (an HF implementation, a hand computation), so its
// numbers are checked against a case computed by hand here: a model whose blocks add nothing (their output
// projections are zero), so the logits after token x are head · RMSNorm(embed[x]). With embed[x] = onehot(x mod
// 64) and head[v] = onehot(v mod 64), the logit of v is r = 1 / sqrt(1/64 + eps) when v = x (mod 64) and 0
// otherwise; 32 of the 2048 ids match, so log p(v | x) = [v = x mod 64] r - log(32 e^r + 2016). The weights go
// in through `keel import-hf`; the .npy files are written here byte by byte, as NumPy's format documents them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint/durable_fs.h"
#include "core/interop/safetensors.h"
#include "keel_process.h"

using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

// A version 1.0 .npy of `rows` x `cols` little-endian integers of `width` bytes (descr e.g. "<i8").
std::string npy(const std::string& descr, const std::string& shape, const std::vector<int64_t>& values, size_t width) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  for (int64_t v : values) {
    for (size_t b = 0; b < width; ++b) out += static_cast<char>((static_cast<uint64_t>(v) >> (8 * b)) & 0xff);
  }
  return out;
}

std::string write_file(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// The tiny model exported, then every tensor zeroed except embed (onehot(x mod 64)), head (onehot(v mod 64)) and
// the final norm (ones), imported as a run. Returns the run dir.
std::string import_hand_model(const std::string& prefix) {
  const std::string run = fresh_dir(prefix + "-run"), hf = fresh_dir(prefix + "-hf"), imported = fresh_dir(prefix);
  auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --set train.steps=1 --run-dir " +
                    run);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("export-hf " + run + "/checkpoints/step-00000001 " + hf);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  auto weights = keel::interop::read_safetensors(hf + "/model.safetensors");
  for (auto& t : weights.tensors) {
    std::vector<float> v(t.bytes.size() / sizeof(float), 0.0f);
    if (t.name == "model.embed_tokens.weight" || t.name == "lm_head.weight") {
      const int64_t rows = t.shape[0], cols = t.shape[1];  // [2048, 64]
      for (int64_t i = 0; i < rows; ++i) v[static_cast<size_t>(i * cols + i % cols)] = 1.0f;
    } else if (t.name == "model.norm.weight") {
      std::fill(v.begin(), v.end(), 1.0f);
    }
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  }
  fs::remove(hf + "/model.safetensors");
  std::ofstream(hf + "/model.safetensors", std::ios::binary) << keel::interop::serialize_safetensors(weights);
  r = run_keel("import-hf " + hf + " --run-dir " + imported + " --config " + tiny_config() + " " +
               test_data_override());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return imported;
}

}  // namespace

TEST(Score, PerSequenceNllMatchesAHandComputedCase) {
  const std::string run = import_hand_model("score-hand"), dir = fresh_dir("score-files");
  fs::create_directories(dir);
  // Row 0: 67 after 3 and 131 after 67 match (3 = 67 = 131 mod 64), 5 after 131 does not. Row 1: none match.
  const std::string tokens = write_file(dir, "rows.npy", npy("<i8", "(2, 4)", {3, 67, 131, 5, 0, 1, 2, 2000}, 8));
  auto r = run_keel("score " + run + " --tokens " + tokens + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto result = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  const double eps = 1e-5;  // rms_norm_eps of the tiny config
  const double logit = 1.0 / std::sqrt(1.0 / 64.0 + eps);
  const double lse = std::log(32.0 * std::exp(logit) + 2016.0);
  ASSERT_EQ(result["sequences"].size(), 2u);
  const auto& first = result["sequences"][0];
  EXPECT_EQ(first["tokens"], 4);
  ASSERT_EQ(first["logprobs"].size(), 3u);
  EXPECT_NEAR(first["logprobs"][0].get<double>(), logit - lse, 1e-5);
  EXPECT_NEAR(first["logprobs"][1].get<double>(), logit - lse, 1e-5);
  EXPECT_NEAR(first["logprobs"][2].get<double>(), -lse, 1e-5);
  EXPECT_NEAR(first["nll"].get<double>(), lse - 2.0 * logit / 3.0, 1e-5);
  EXPECT_NEAR(result["sequences"][1]["nll"].get<double>(), lse, 1e-5);
  EXPECT_NEAR(result["mean_nll"].get<double>(), lse - logit / 3.0, 1e-5);

  // The same rows as uint16, and the text output.
  const std::string narrow = write_file(dir, "rows16.npy", npy("<u2", "(2, 4)", {3, 67, 131, 5, 0, 1, 2, 2000}, 2));
  r = run_keel("score " + run + " --tokens " + narrow);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("sequence 0: 4 tokens, nll"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("over 2 sequences"), std::string::npos) << r.output;
}

TEST(Score, TextIsTokenizedWithTheCheckpointsTokenizerAndBadInputIsRefusedByName) {
  const std::string run = fresh_dir("score-text-run"), dir = fresh_dir("score-bad");
  auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --set train.steps=1 --run-dir " +
                    run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::create_directories(dir);
  const std::string text = write_file(dir, "text.txt", "The quick brown fox.\n\nJumps over the lazy dog.\n");
  r = run_keel("score " + run + " --text " + text + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto result = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  ASSERT_EQ(result["sequences"].size(), 2u) << "one sequence per non-empty line";
  for (const auto& s : result["sequences"]) {
    EXPECT_GE(s["tokens"].get<int64_t>(), 2);
    EXPECT_GT(s["nll"].get<double>(), 0.0);
    EXPECT_EQ(s["logprobs"].size(), s["tokens"].get<size_t>() - 1);
  }

  const auto refused = [&](const std::string& name, const std::string& bytes, const std::string& message) {
    const std::string path = write_file(dir, name, bytes);
    const auto out = run_keel("score " + run + " --tokens " + path);
    EXPECT_NE(out.exit_code, 0) << name;
    EXPECT_NE(out.output.find(message), std::string::npos) << name << ": " << out.output;
  };
  refused("magic.npy", "not numpy at all", "magic.npy: offset 0: bad magic");
  refused("three.npy", npy("<i8", "(1, 2, 1)", {1, 2}, 8), "three.npy: shape (1, 2, 1), expected a 2-D array");
  refused("float.npy", npy("<f4", "(1, 2)", {0, 0}, 4), "float.npy: offset 10: dtype '<f4' is a float type");
  refused("short.npy", npy("<i8", "(2, 2)", {1, 2}, 8), "short.npy: 16 data bytes, shape (2, 2) of '<i8' needs 32");
  refused("vocab.npy", npy("<i4", "(1, 3)", {1, 2048, 3}, 4),
          "vocab.npy: row 0, token 1: id 2048 is outside the vocabulary [0, 2048)");
  refused("negative.npy", npy("<i4", "(1, 2)", {1, -1}, 4), "row 0, token 1: id -1 is outside the vocabulary");
  refused("long.npy", npy("<i8", "(1, 66)", std::vector<int64_t>(66, 5), 8),
          "long.npy: row 0: 66 tokens, the model takes at most 65 (model.seq_len + 1)");
  refused("single.npy", npy("<i8", "(1, 1)", {5}, 8), "single.npy: row 0: 1 tokens, need at least 2");
  r = run_keel("score " + run);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("give exactly one of --tokens FILE.npy and --text FILE"), std::string::npos) << r.output;
}

// Why: `data.tokenizer` end to end with a tokenizer Keel did not make: Debian's `spm_train` (package
// sentencepiece, installed by scripts/setup.sh) trains a LLaMA-style SentencePiece model (unk 0, BOS 1, EOS 2,
// PAD 3, byte fallback), and the test checks that prepare copies it into data.dir with its SHA-256, uses its
// special ids (BOS before every document with data.add_bos), states the padding rows, refuses a vocabulary larger
// than model.vocab naming both numbers and a BOS-less tokenizer with add_bos; that a run trains on it, that
// export-hf ships it with its special ids (config.json's bos/eos/pad_token_id, tokenizer_config.json's pieces and
// add_bos_token = data.add_bos; read as JSON, no transformers needed), also with --no-tokenizer; and that a resume
// onto data of another tokenizer is refused naming both hashes.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/checkpoint/sha256.h"
#include "core/data/shard.h"
#include "keel_process.h"

using namespace keel::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Fortune-style documents of plain words, one sentence per line (spm_train reads lines).
std::string write_corpus(const std::string& dir) {
  static const char* const kWords[] = {"the",   "river", "stone",  "quiet", "morning", "light", "carries",
                                       "over",  "a",     "field",  "of",    "green",   "wind",  "slowly",
                                       "under", "old",   "bridge", "birds", "sing",    "and",   "rain"};
  std::string text;
  uint32_t state = 99;
  for (int d = 0; d < 80; ++d) {
    for (int w = 0; w < 30; ++w) {
      state = state * 1664525u + 1013904223u;
      text += std::string(w ? " " : "") + kWords[(state >> 16) % (sizeof kWords / sizeof kWords[0])];
    }
    text += ".\n%\n";
  }
  fs::create_directories(dir);
  std::ofstream(dir + "/corpus.txt") << text;
  return dir + "/corpus.txt";
}

// spm_train on `corpus` into PREFIX.model; returns the model path.
std::string spm_train(const std::string& corpus, const std::string& prefix, int vocab, int bos_id) {
  const auto r = run_shell(
      "spm_train --input=" + corpus + " --model_prefix=" + prefix + " --vocab_size=" + std::to_string(vocab) +
      " --model_type=bpe --byte_fallback=true --character_coverage=1.0 --unk_id=0 --bos_id=" + std::to_string(bos_id) +
      " --eos_id=2 --pad_id=3 --hard_vocab_limit=false" + " --minloglevel=2 2>&1");
  EXPECT_EQ(r.exit_code, 0) << "spm_train (Debian package sentencepiece; scripts/setup.sh installs it) failed:\n"
                            << r.output;
  return prefix + ".model";
}

int64_t pieces_of(const std::string& prefix) {  // lines of spm_train's PREFIX.vocab: one per piece
  std::ifstream in(prefix + ".vocab");
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

std::string write_config(const std::string& dir, const std::string& corpus, const std::string& data,
                         const std::string& tokenizer, int vocab) {
  const std::string path = dir + "/" + fs::path(data).filename().string() + ".ini";
  std::ofstream(path) << "[model]\nlayers = 1\nd_model = 32\nheads = 2\nkv_heads = 2\nffn_hidden = 64\nvocab = "
                      << vocab
                      << "\nseq_len = 32\n[train]\nsteps = 2\nmicro_batch = 2\ngrad_accum = 1\nprecision = fp32\n"
                         "threads = 1\n[data]\ndir = "
                      << data << "\ntokenizer = " << tokenizer
                      << "\nadd_bos = true\nchunks = 2\n[source.notes]\ninputs = " << corpus
                      << "\nsplit = fortune\nheldout = 2\n";
  return path;
}

}  // namespace

TEST(ExternalTokenizer, PrepareTrainExportWithAnSpmTrainedTokenizer) {
  const std::string root = fresh_dir("ext-tokenizer");
  const std::string corpus = write_corpus(root);
  const std::string tok_a = spm_train(corpus, root + "/llama-a", 400, 1);
  const std::string tok_b = spm_train(corpus, root + "/llama-b", 350, 1);
  ASSERT_TRUE(fs::exists(tok_a) && fs::exists(tok_b));
  const int64_t pieces = pieces_of(root + "/llama-a");
  ASSERT_GT(pieces, 260);
  ASSERT_LE(pieces, 400);

  // Prepare: the model copied with its hash, its special ids used, the padding rows stated.
  const std::string data_a = root + "/data-a";
  const std::string config = write_config(root, corpus, data_a, tok_a, 512);
  auto r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("model.vocab = 512 but the tokenizer has " + std::to_string(pieces) +
                          " pieces: " + std::to_string(512 - pieces) + " padding rows"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(read_all(data_a + "/tokenizer.model"), read_all(tok_a));
  std::ifstream prepared_in(data_a + "/prepared.json");
  const json prepared = json::parse(prepared_in);
  const std::string sha_a = keel::checkpoint::sha256_file(tok_a);
  const json& tok = prepared.at("tokenizer");
  EXPECT_EQ(tok.at("sha256"), sha_a);
  EXPECT_EQ(tok.at("fingerprint"), sha_a);
  EXPECT_EQ(tok.at("pieces"), pieces);
  EXPECT_EQ(tok.at("padding_rows"), 512 - pieces);
  EXPECT_EQ(tok.at("bos_id"), 1);
  EXPECT_EQ(tok.at("eos_id"), 2);
  EXPECT_EQ(tok.at("pad_id"), 3);
  EXPECT_EQ(tok.at("add_bos"), true);
  EXPECT_EQ(prepared.at("eos_id"), 2);
  // Every document is BOS ... EOS, in the training shards and in the held-out set.
  const json& source = prepared.at("sources").at(0);
  for (const auto* shards : {&source.at("shards"), &source.at("heldout").at("shards")}) {
    const auto ids =
        keel::data::ShardReader(data_a + "/" + shards->at(0).at("file").get<std::string>(), 512).read_all();
    ASSERT_GE(ids.size(), 2u);
    EXPECT_EQ(ids.front(), 1);
    EXPECT_EQ(ids.back(), 2);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), 1), std::count(ids.begin(), ids.end(), 2));
  }

  // Train two steps on it, then export: the tokenizer and its EOS id go along.
  const std::string run = root + "/run";
  r = run_keel("train --config " + config + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("export-hf " + run + "/checkpoints/step-00000002 " + root + "/hf");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_all(root + "/hf/tokenizer.model"), read_all(tok_a));
  std::ifstream hf_config_in(root + "/hf/config.json");
  const json hf_config = json::parse(hf_config_in);
  EXPECT_EQ(hf_config.at("eos_token_id"), 2);
  EXPECT_EQ(hf_config.at("bos_token_id"), 1);
  EXPECT_EQ(hf_config.at("pad_token_id"), 3);
  EXPECT_EQ(hf_config.at("vocab_size"), 512);
  EXPECT_NE(r.output.find("bos_token_id 1 (added before every document), pad_token_id 3"), std::string::npos)
      << r.output;
  std::ifstream tokenizer_config_in(root + "/hf/tokenizer_config.json");
  const json tokenizer_config = json::parse(tokenizer_config_in);
  EXPECT_EQ(tokenizer_config.at("add_bos_token"), true);  // data.add_bos = true: HF adds it as training did
  EXPECT_EQ(tokenizer_config.at("add_eos_token"), false);
  EXPECT_EQ(tokenizer_config.at("bos_token"), "<s>");
  EXPECT_EQ(tokenizer_config.at("eos_token"), "</s>");
  EXPECT_EQ(tokenizer_config.at("pad_token"), "<pad>");
  EXPECT_EQ(tokenizer_config.at("unk_token"), "<unk>");
  // Without the tokenizer, config.json still carries the ids prepared.json records for it.
  r = run_keel("export-hf " + run + "/checkpoints/step-00000002 " + root + "/hf-bare --no-tokenizer");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(fs::exists(root + "/hf-bare/tokenizer.model"));
  std::ifstream bare_in(root + "/hf-bare/config.json");
  const json bare = json::parse(bare_in);
  EXPECT_EQ(bare.at("bos_token_id"), 1);
  EXPECT_EQ(bare.at("eos_token_id"), 2);
  EXPECT_EQ(bare.at("pad_token_id"), 3);

  // Another tokenizer's data: a resume onto it is refused naming both hashes.
  const std::string data_b = root + "/data-b";
  r = run_keel("data prepare --config " + write_config(root, corpus, data_b, tok_b, 512));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("resume --from " + run + " --run-dir " + root + "/run2 --set data.dir=" + data_b +
               " --set data.tokenizer=" + tok_b + " --set train.steps=4");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("another vocabulary or tokenizer"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(sha_a), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(keel::checkpoint::sha256_file(tok_b)), std::string::npos) << r.output;
}

TEST(ExternalTokenizer, RefusesAVocabularyLargerThanTheModelAndAddBosWithoutBos) {
  const std::string root = fresh_dir("ext-tokenizer-bad");
  const std::string corpus = write_corpus(root);
  const std::string tok = spm_train(corpus, root + "/llama", 400, 1);
  const int64_t pieces = pieces_of(root + "/llama");
  auto r = run_keel("data prepare --config " + write_config(root, corpus, root + "/small", tok, 256));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("data.tokenizer " + tok + ": tokenizer has " + std::to_string(pieces) +
                          " pieces, more than model.vocab = 256"),
            std::string::npos)
      << r.output;

  const std::string no_bos = spm_train(corpus, root + "/nobos", 400, -1);
  r = run_keel("data prepare --config " + write_config(root, corpus, root + "/nobos-data", no_bos, 512));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("data.add_bos = true but the tokenizer has no BOS piece"), std::string::npos) << r.output;

  r = run_keel("data prepare --config " + write_config(root, corpus, root + "/missing", root + "/nope.model", 512));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("data.tokenizer = " + root + "/nope.model: file not found"), std::string::npos) << r.output;
}

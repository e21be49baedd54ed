// Why: the tokenizer and `keel data prepare` define what a model sees. Training must be deterministic, text must
// round-trip exactly (indentation and newlines included — code depends on them), and prepare must list inputs
// as documented (fortune splitting, .dat and binary files skipped, symlinked duplicates dropped) and do nothing
// the second time. Small generated corpora keep these tests fast.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/data/loader.h"
#include "core/data/prepare.h"
#include "core/data/shard.h"
#include "core/data/show_batch.h"
#include "core/data/tokenizer.h"
#include "test_support.h"

namespace fs = std::filesystem;
using keel::data::DataError;
using nlohmann::json;

namespace {

using keel::testing::test_dir;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Deterministic English-ish prose and Python-ish code.
std::string prose_text(int paragraphs, uint64_t seed) {
  static const char* words[] = {"the",   "model", "learns", "from",   "data", "and",   "every", "batch",
                                "is",    "a",     "step",   "toward", "loss", "falls", "when",  "we",
                                "train", "long",  "enough", "tokens", "of",   "text",  "code",  "spike"};
  std::string out;
  uint64_t x = seed;
  for (int p = 0; p < paragraphs; ++p) {
    for (int w = 0; w < 30; ++w) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      out += words[(x >> 33) % 24];
      out += (w % 10 == 9) ? ".\n" : " ";
    }
    out += "\n";
  }
  return out;
}

std::string code_text(int functions, uint64_t seed) {
  std::string out;
  for (int f = 0; f < functions; ++f) {
    const std::string n = std::to_string((seed + f) % 97);
    out += "def step_" + n + "(batch, lr=0.1):\n    loss = model(batch)\n    if loss > " + n +
           ":\n        return None\n    return loss * lr\n\n";
  }
  return out;
}

std::string write(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

}  // namespace

TEST(Tokenizer, TrainEncodeDecodeRoundTrip) {
  const std::string dir = test_dir();
  const std::string text = write(dir + "/train.txt", prose_text(60, 1) + code_text(60, 3));
  keel::data::train_tokenizer(text, dir + "/tok", 400);
  ASSERT_TRUE(fs::exists(dir + "/tok.model"));
  keel::data::Tokenizer tok(dir + "/tok.model");
  EXPECT_LE(tok.vocab_size(), 400);
  EXPECT_GT(tok.vocab_size(), 300);
  EXPECT_EQ(tok.eos_id(), keel::data::kEosId);

  for (const std::string& s :
       {std::string("the model learns from data.\n"), std::string("def f(x):\n    return x\n\n\tindented\n"),
        std::string("  leading and trailing spaces  "), std::string("unseen: héllo wörld ✓ 42 {}[]~\r\n"),
        std::string("")}) {
    const auto ids = tok.encode(s);
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tok.vocab_size());
      EXPECT_NE(id, keel::data::kUnkId) << "byte fallback should make unk unnecessary: " << s;
    }
    EXPECT_EQ(tok.decode(ids), s);
  }
  // Merges were learned: common words take fewer tokens than bytes.
  EXPECT_LT(tok.encode("the model learns from data").size(), 10u);
}

TEST(Tokenizer, TrainingIsDeterministic) {
  const std::string dir = test_dir();
  const std::string text = write(dir + "/train.txt", prose_text(40, 7) + code_text(40, 9));
  keel::data::train_tokenizer(text, dir + "/a", 350);
  keel::data::train_tokenizer(text, dir + "/b", 350);
  // The .model files differ only in the model_prefix they record; the pieces and encodings must be equal.
  const keel::data::Tokenizer a(dir + "/a.model"), b(dir + "/b.model");
  ASSERT_EQ(a.vocab_size(), b.vocab_size());
  for (int32_t id = 0; id < a.vocab_size(); ++id) ASSERT_EQ(a.id_to_piece(id), b.id_to_piece(id)) << id;
  EXPECT_TRUE(a.encode(prose_text(5, 99)) == b.encode(prose_text(5, 99)));
}

TEST(Tokenizer, TooManyDistinctCharactersForTheVocabNamesModelVocab) {
  // 600 distinct CJK characters, equally frequent: SentencePiece must keep each as a piece, more than a vocab of
  // 300 holds.
  std::string text;
  for (int round = 0; round < 20; ++round) {
    for (uint32_t cp = 0x4E00; cp < 0x4E00 + 600; ++cp) {
      text += static_cast<char>(0xE0 | (cp >> 12));
      text += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      text += static_cast<char>(0x80 | (cp & 0x3F));
    }
    text += "\n";
  }
  const std::string dir = test_dir();
  const std::string path = write(dir + "/cjk.txt", text);
  const std::string error = keel::testing::data_error_of([&] { keel::data::train_tokenizer(path, dir + "/tok", 300); });
  EXPECT_NE(error.find("required_chars"), std::string::npos) << error;
  EXPECT_NE(error.find("model.vocab = 300"), std::string::npos) << error;
  EXPECT_FALSE(fs::exists(dir + "/tok.model"));
}

TEST(Tokenizer, LoadErrorsNameThePath) {
  keel::data::Tokenizer tok;
  EXPECT_FALSE(tok.loaded());
  try {
    tok.load("/nonexistent/tok.model");
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tok.model"), std::string::npos);
  }
}

TEST(DataPrepare, SplitsFortuneFiles) {
  const auto docs = keel::data::split_documents("one\nline\n%\ntwo\n%\n%\n%x\n  \n%\nthree", "fortune");
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0], "one\nline\n");
  EXPECT_EQ(docs[1], "two\n");     // the empty document between two "%" lines is dropped
  EXPECT_EQ(docs[2], "%x\n  \n");  // only a line that is exactly "%" separates
  EXPECT_EQ(docs[3], "three");
  EXPECT_EQ(keel::data::split_documents("whole\nfile\n", "file").size(), 1u);
  EXPECT_TRUE(keel::data::split_documents(" \n\t", "file").empty());
}

TEST(DataPrepare, ListsInputsDeterministically) {
  const std::string dir = test_dir();
  write(dir + "/fortunes/b", "b1\n%\nb2\n");
  write(dir + "/fortunes/a", "a1\n%\na2\n");
  write(dir + "/fortunes/a.dat", std::string("\0\0\0\2binary index", 16));
  fs::create_symlink("a", dir + "/fortunes/a.u8");
  write(dir + "/code/z.py", "print(1)\n");
  write(dir + "/code/pkg/m.py", "x = 1\n");
  write(dir + "/code/notes.txt", "not python\n");
  write(dir + "/code/blob.py", std::string("\x7f"
                                           "ELF\0\0",
                                           6));

  keel::SourceConfig prose;
  prose.name = "prose";
  prose.split = "fortune";
  prose.inputs = {dir + "/fortunes"};
  const auto files = keel::data::list_source_files(prose);
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].path, dir + "/fortunes/a");
  EXPECT_EQ(files[1].path, dir + "/fortunes/b");

  keel::SourceConfig code;
  code.name = "code";
  code.include = "*.py";
  code.inputs = {dir + "/code", dir + "/code/z.py"};  // z.py listed twice: kept once
  const auto code_files = keel::data::list_source_files(code);
  ASSERT_EQ(code_files.size(), 2u);
  EXPECT_EQ(code_files[0].path, dir + "/code/pkg/m.py");
  EXPECT_EQ(code_files[1].path, dir + "/code/z.py");

  code.max_mb = 1e-9;  // stop after the first file
  EXPECT_EQ(keel::data::list_source_files(code).size(), 1u);

  code.inputs = {dir + "/missing"};
  try {
    keel::data::list_source_files(code);
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/missing does not exist"), std::string::npos) << e.what();
  }
}

TEST(DataPrepare, PreparesOnceThenDoesNothing) {
  const std::string dir = test_dir();
  for (int i = 0; i < 4; ++i) {
    std::string fortunes;
    for (int d = 0; d < 30; ++d) fortunes += prose_text(1, i * 100 + d) + "%\n";
    write(dir + "/in/fortunes/f" + std::to_string(i), fortunes);
    write(dir + "/in/py/m" + std::to_string(i) + ".py", code_text(20, i));
  }
  keel::Config config;
  config.source_file = "test.ini";
  config.model.vocab = 512;
  config.model.seq_len = 16;
  config.data.dir = dir + "/prepared";
  config.data.tokenizer_sample_mb = 1;
  keel::SourceConfig prose;
  prose.name = "prose";
  prose.split = "fortune";
  prose.inputs = {dir + "/in/fortunes"};
  keel::SourceConfig code;
  code.name = "code";
  code.include = "*.py";
  code.inputs = {dir + "/in/py"};
  config.data.sources = {prose, code};

  const auto first = keel::data::prepare_data(config);
  EXPECT_FALSE(first.up_to_date);
  EXPECT_TRUE(first.tokenizer_trained);
  ASSERT_EQ(first.sources.size(), 2u);
  // The default held-out share (1%, at least one document) keeps one document of each source out of training.
  EXPECT_EQ(first.sources[0].documents + first.sources[0].heldout_documents, 120);
  EXPECT_EQ(first.sources[0].heldout_documents, 1);
  EXPECT_EQ(first.sources[1].documents + first.sources[1].heldout_documents, 4);
  EXPECT_EQ(first.sources[1].heldout_documents, 1);
  EXPECT_EQ(first.eos_id, keel::data::kEosId);

  const json manifest = json::parse(slurp(config.data.dir + "/prepared.json"));
  EXPECT_EQ(manifest["vocab"], 512);
  EXPECT_EQ(manifest["fingerprint"], first.fingerprint);
  EXPECT_EQ(manifest["sources"][0]["files"].size(), 4u);
  const auto& shard = manifest["sources"][0]["shards"][0];
  keel::data::ShardReader reader(config.data.dir + "/" + shard["file"].get<std::string>(), 512);
  EXPECT_EQ(reader.num_tokens(), shard["tokens"].get<int64_t>());
  EXPECT_EQ(reader.num_tokens(), first.sources[0].tokens);
  EXPECT_EQ(reader.token(reader.num_tokens() - 1), keel::data::kEosId);  // every document ends with EOS
  // Decoding a whole source gives back its documents.
  keel::data::Tokenizer tok(config.data.dir + "/tokenizer.model");
  std::vector<int32_t> first_doc;
  for (int32_t t : reader.read_all()) {
    if (t == keel::data::kEosId) break;
    first_doc.push_back(t);
  }
  EXPECT_EQ(tok.decode(first_doc), prose_text(1, 0));

  const auto model_time = fs::last_write_time(config.data.dir + "/tokenizer.model");
  const auto second = keel::data::prepare_data(config);
  EXPECT_TRUE(second.up_to_date);
  EXPECT_EQ(second.fingerprint, first.fingerprint);
  EXPECT_EQ(fs::last_write_time(config.data.dir + "/tokenizer.model"), model_time);

  // A changed setting is noticed; the loader opens the result and shows batches.
  config.data.sources[1].max_mb = 1e-9;
  const auto third = keel::data::prepare_data(config);
  EXPECT_FALSE(third.up_to_date);
  EXPECT_NE(third.fingerprint, first.fingerprint);
  EXPECT_EQ(third.sources[1].files, 1);
  keel::data::DataLoader loader(config, 4);
  EXPECT_EQ(loader.eos_id(), keel::data::kEosId);
  const std::string shown = keel::data::show_batch(config, 3, 8);
  EXPECT_NE(shown.find("step 3: global batch"), std::string::npos) << shown;
  EXPECT_NE(shown.find("[3] source="), std::string::npos) << shown;
  EXPECT_NE(shown.find("text: \""), std::string::npos) << shown;
}

TEST(DataPrepare, RefusesAConfigWithoutSources) {
  keel::Config config;
  config.data.dir = test_dir();
  try {
    keel::data::prepare_data(config);
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("no data sources"), std::string::npos);
  }
}

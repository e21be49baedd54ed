// Why: pre-tokenized corpora (Megatron-LM .bin/.idx, OLMo .npy, raw uint16/uint32 arrays) come from other tools and
// are read in place, so the readers are the only guard between someone else's bytes and the embedding table. The
// files here are written by independent writers — the .idx byte by byte exactly as Megatron's indexed_dataset.py
// lays it out, .npy files by numpy (Debian's /usr/bin/python3) — and every way they can be wrong must be refused at
// open time naming the file and byte offset. Then prepare + DataLoader on such sources: windows, documents, the
// up-to-date check, a file changed after prepare, the refusals (no data.eos_id, mixed with text), and the config
// keys (written to config.ini only when set, so existing configs hash as before).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/config/config.h"
#include "core/data/documents.h"
#include "core/data/loader.h"
#include "core/data/prepare.h"
#include "core/data/pretokenized.h"
#include "core/data/pretokenized_source.h"
#include "test_support.h"

namespace fs = std::filesystem;
using keel::data::MappedTokens;

namespace {

using keel::testing::test_dir;
const auto error_of = keel::testing::data_error_of;

using Bytes = std::vector<unsigned char>;

void put(Bytes& b, uint64_t v, int width) {
  for (int i = 0; i < width; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
}
void write_file(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A Megatron indexed dataset as indexed_dataset.py writes it: documents of sequences of tokens.
struct Megatron {
  int code = 8;  // uint16
  int width = 2;
  std::vector<std::vector<std::vector<int64_t>>> docs;  // doc -> sequences -> tokens
  Bytes idx() const {
    Bytes b = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
    put(b, 1, 8);
    b.push_back(static_cast<unsigned char>(code));
    std::vector<int64_t> lengths, pointers, doc_index = {0};
    int64_t pointer = 0;
    for (const auto& d : docs) {
      for (const auto& s : d) {
        lengths.push_back(static_cast<int64_t>(s.size()));
        pointers.push_back(pointer);
        pointer += static_cast<int64_t>(s.size()) * width;
      }
      doc_index.push_back(static_cast<int64_t>(lengths.size()));
    }
    put(b, lengths.size(), 8);
    put(b, doc_index.size(), 8);
    for (int64_t v : lengths) put(b, static_cast<uint64_t>(v), 4);
    for (int64_t v : pointers) put(b, static_cast<uint64_t>(v), 8);
    for (int64_t v : doc_index) put(b, static_cast<uint64_t>(v), 8);
    return b;
  }
  Bytes bin() const {
    Bytes b;
    for (const auto& d : docs)
      for (const auto& s : d)
        for (int64_t t : s) put(b, static_cast<uint64_t>(t), width);
    return b;
  }
  void write(const std::string& prefix) const {
    write_file(prefix + ".idx", idx());
    write_file(prefix + ".bin", bin());
  }
};

Megatron three_docs() {
  Megatron m;
  m.docs = {{{5, 6, 7}, {8, 1}}, {{9, 10, 11, 1}}, {{12, 1}}};  // 11 tokens, docs start at 0, 5, 9
  return m;
}

// Runs numpy (Debian's python3) once for all (path, code) pairs: each code runs with `np` and `out` (its path)
// defined. One interpreter for all files: starting numpy costs ~0.25 s.
void numpy_write_all(const std::vector<std::pair<std::string, std::string>>& files) {
  ASSERT_FALSE(files.empty());
  const std::string script = files.front().first + ".py";  // beside the files: test_dir() would empty the dir
  {
    std::ofstream py(script);
    py << "import numpy as np\n";
    for (const auto& [path, code] : files) py << "out = '" << path << "'\n" << code << "\n";
  }
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script).c_str()), 0) << script;
}

std::vector<int64_t> all_tokens(const keel::data::TokenStream& t) {
  std::vector<int64_t> out(static_cast<size_t>(t.num_tokens()));
  t.read(0, t.num_tokens(), out.data());
  return out;
}

}  // namespace

TEST(Megatron, ReadsTokensAndDocuments) {
  const std::string prefix = test_dir() + "/corpus_text_document";
  three_docs().write(prefix);
  for (const std::string& input : {prefix, prefix + ".bin", prefix + ".idx"}) {
    const auto ds = keel::data::open_megatron(input, 16);
    EXPECT_EQ(ds.index.sequences, 4);
    EXPECT_EQ(ds.index.tokens, 11);
    EXPECT_EQ(ds.index.document_starts, (std::vector<int64_t>{0, 5, 9}));
    EXPECT_EQ(all_tokens(ds.tokens), (std::vector<int64_t>{5, 6, 7, 8, 1, 9, 10, 11, 1, 12, 1}));
    EXPECT_EQ(ds.tokens.path(), prefix + ".bin");
  }
  // int32 (code 4) and int64 (code 5) ids read the same.
  for (auto [code, width] : {std::pair{4, 4}, std::pair{5, 8}, std::pair{1, 1}}) {
    Megatron m = three_docs();
    m.code = code;
    m.width = width;
    m.write(prefix);
    EXPECT_EQ(all_tokens(keel::data::open_megatron(prefix, 16).tokens),
              (std::vector<int64_t>{5, 6, 7, 8, 1, 9, 10, 11, 1, 12, 1}));
  }
}

TEST(Megatron, CorruptIndexRefusedWithFileAndOffset) {
  const std::string prefix = test_dir() + "/c";
  const std::string idx = prefix + ".idx", bin = prefix + ".bin";
  const Megatron good = three_docs();
  // S = 4 sequences, D = 4 document indices: lengths at 34, pointers at 50, documents at 82, size 114.
  struct Case {
    std::string name;
    std::function<void(Bytes& idx, Bytes& bin)> damage;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"magic", [](Bytes& i, Bytes&) { i[0] = 'X'; }, idx + ": offset 0: bad magic"},
      {"version", [](Bytes& i, Bytes&) { i[9] = 2; }, idx + ": offset 9: unsupported version 2"},
      {"float", [](Bytes& i, Bytes&) { i[17] = 7; }, idx + ": offset 17: dtype code 7 (float32) holds no token ids"},
      {"code", [](Bytes& i, Bytes&) { i[17] = 9; }, idx + ": offset 17: unknown dtype code 9"},
      {"short header", [](Bytes& i, Bytes&) { i.resize(20); }, idx + ": offset 20: truncated"},
      {"truncated", [](Bytes& i, Bytes&) { i.pop_back(); }, idx + ": offset 18: truncated: file is 113 bytes"},
      {"trailing", [](Bytes& i, Bytes&) { i.push_back(0); }, idx + ": offset 115: trailing bytes"},
      {"huge count", [](Bytes& i, Bytes&) { i[25] = 0x7f; }, idx + ": offset 18: truncated"},
      {"negative length", [](Bytes& i, Bytes&) { i[37] = 0x80; }, idx + ": offset 34: sequence 0 has negative length"},
      {"gap", [](Bytes& i, Bytes&) { i[58] = 7; },
       idx + ": offset 58: sequence 1 starts at byte 7 of the .bin, expected 6"},
      {"past bin", [](Bytes&, Bytes& b) { b.resize(20); },
       idx + ": offset 46: sequence 3 (2 tokens from byte 18) runs past"},
      {"bin trailing", [](Bytes&, Bytes& b) { b.push_back(0), b.push_back(0); },
       idx + ": offset 50: the sequences cover 22 bytes"},
      {"doc first", [](Bytes& i, Bytes&) { i[82] = 1; }, idx + ": offset 82: document index 0 = 1: expected 0"},
      {"doc last", [](Bytes& i, Bytes&) { i[106] = 3; }, idx + ": offset 106: document index 3 = 3: expected 4"},
      {"doc order", [](Bytes& i, Bytes&) { i[90] = 3, i[98] = 2; }, idx + ": offset 98: document index 2 = 2"},
      {"token", [](Bytes&, Bytes& b) { b[6] = 16; }, bin + ": offset 6: token id 16 >= vocab 16 (token 3)"},
  };
  for (const auto& c : cases) {
    Bytes i = good.idx(), b = good.bin();
    c.damage(i, b);
    write_file(idx, i);
    write_file(bin, b);
    const std::string message = error_of([&] { keel::data::open_megatron(prefix, 16); });
    EXPECT_EQ(message.rfind(c.expect, 0), 0u) << c.name << ": " << message;
  }
  // An empty document (Keel numbers documents by their first token).
  Megatron empty = three_docs();
  empty.docs.insert(empty.docs.begin() + 1, std::vector<std::vector<int64_t>>{std::vector<int64_t>{}});
  empty.write(prefix);
  EXPECT_NE(error_of([&] { keel::data::open_megatron(prefix, 16); }).find("document 1 has no tokens"),
            std::string::npos);
  // Negative ids in a signed dtype; a missing .bin.
  Megatron negative = three_docs();
  negative.code = 4;
  negative.width = 4;
  negative.docs[2][0][0] = -3;
  negative.write(prefix);
  EXPECT_EQ(error_of([&] { keel::data::open_megatron(prefix, 16); }), bin + ": offset 36: token id -3 < 0 (token 9)");
  fs::remove(bin);
  EXPECT_NE(error_of([&] { keel::data::open_megatron(prefix, 16); }).find(bin), std::string::npos);
}

TEST(Npy, ReadsNumpyArraysOfEveryIntegerType) {
  const std::string dir = test_dir(), path = dir + "/part-0.npy";
  const std::vector<std::string> dtypes = {"<u2", "<u4", "<i4", "<i8", "|u1"};
  std::vector<std::pair<std::string, std::string>> files;
  for (size_t k = 0; k < dtypes.size(); ++k)
    files.push_back({dir + "/t" + std::to_string(k) + ".npy",
                     "np.save(out, np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype='" + dtypes[k] + "'))"});
  files.push_back(
      {dir + "/v2.npy", "np.lib.format.write_array(open(out, 'wb'), np.arange(5, dtype='<u2'), version=(2, 0))"});
  files.push_back({path, "np.save(out, np.array([3, 1, 4, 1, 5, 9, 2, 1], dtype='<u2'))"});
  numpy_write_all(files);
  for (size_t k = 0; k < dtypes.size(); ++k) {
    const std::string& dtype = dtypes[k];
    const MappedTokens t = keel::data::open_npy(files[k].first, 10);
    EXPECT_EQ(all_tokens(t), (std::vector<int64_t>{3, 1, 4, 1, 5, 9, 2, 6})) << dtype;
    EXPECT_EQ(t.dtype().name(), (dtype[1] == 'i' ? "int" : "uint") + std::to_string(8 * (dtype[2] - '0'))) << dtype;
  }
  // numpy's format 2.0 header.
  EXPECT_EQ(all_tokens(keel::data::open_npy(dir + "/v2.npy", 10)), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  // Document starts at EOS = 1 (an EOS that ends the data starts nothing).
  std::vector<int64_t> starts;
  keel::data::append_eos_document_starts(keel::data::open_npy(path, 10), 1, 100, starts);
  EXPECT_EQ(starts, (std::vector<int64_t>{100, 102, 104, 108}));
}

TEST(Npy, BadArraysRefusedWithFileAndOffset) {
  const std::string dir = test_dir();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"np.save(out, np.arange(4, dtype='<f4'))", "dtype '<f4' is a float type"},
      {"np.save(out, np.arange(4, dtype='>u2'))", "dtype '>u2' is big-endian"},
      {"np.save(out, np.asfortranarray(np.zeros((2, 3), dtype='<u2')))", "'fortran_order' is not False"},
      {"np.save(out, np.zeros((2, 3), dtype='<u2'))", "'shape' is not one-dimensional"},
      {"np.save(out, np.array([1, 2, 10], dtype='<u2'))", "offset 132: token id 10 >= vocab 10 (token 2)"},
      {"np.save(out, np.array([1, -2], dtype='<i4'))", "offset 132: token id -2 < 0 (token 1)"},
      {"np.save(out, np.arange(4, dtype='<u2'))\nopen(out, 'ab').write(b'xy')", "trailing bytes: file is 138 bytes"},
      {"np.save(out, np.arange(4, dtype='<u2'))\nimport os; os.truncate(out, 135)", "truncated: file is 135 bytes"},
      {"open(out, 'wb').write(b'PK\\x03\\x04 not numpy')", "offset 0: bad magic"},
      {"np.save(out, np.arange(4, dtype='<u2'))\nb = bytearray(open(out, 'rb').read()); b[6] = 9; "
       "open(out, 'wb').write(b)",
       "offset 6: unsupported .npy version 9.0"},
  };
  std::vector<std::pair<std::string, std::string>> files;
  for (size_t k = 0; k < cases.size(); ++k)
    files.push_back({dir + "/bad" + std::to_string(k) + ".npy", cases[k].first});
  numpy_write_all(files);
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& [code, expect] = cases[k];
    const std::string& path = files[k].first;
    const std::string message = error_of([&] { keel::data::open_npy(path, 10); });
    EXPECT_EQ(message.rfind(path + ": offset ", 0), 0u) << message;
    EXPECT_NE(message.find(expect), std::string::npos) << code << " -> " << message;
  }
}

TEST(Npy, RawArrays) {
  const std::string path = test_dir() + "/tokens.u32";
  Bytes b;
  for (uint64_t t : {7, 1, 70000, 1}) put(b, t, 4);
  write_file(path, b);
  EXPECT_EQ(all_tokens(keel::data::open_raw_tokens(path, "uint32", 70001)), (std::vector<int64_t>{7, 1, 70000, 1}));
  EXPECT_EQ(all_tokens(keel::data::open_raw_tokens(path, "uint16", 70001)),
            (std::vector<int64_t>{7, 0, 1, 0, 4464, 1, 1, 0}));
  EXPECT_EQ(error_of([&] { keel::data::open_raw_tokens(path, "uint32", 100); }),
            path + ": offset 8: token id 70000 >= vocab 100 (token 2)");
  b.push_back(0);
  write_file(path, b);
  EXPECT_NE(error_of([&] {
              keel::data::open_raw_tokens(path, "uint32", 70001);
            }).find(path + ": offset 16: file is 17 bytes: 17 bytes of tokens are not a whole number of uint32"),
            std::string::npos);
}

namespace {

keel::Config pretokenized_config(const std::string& dir, const std::string& format,
                                 const std::vector<std::string>& inputs) {
  keel::Config config;
  config.model.vocab = 16;
  config.model.seq_len = 4;
  config.data.dir = dir + "/prepared";
  config.data.eos_id = 1;
  keel::SourceConfig s;
  s.name = "corpus";
  s.format = format;
  s.inputs = inputs;
  s.heldout = 0;  // these tests read whole files; HeldOut* below hold documents out
  config.data.sources.push_back(s);
  return config;
}

}  // namespace

TEST(PretokenizedSource, PrepareRecordsFilesAndDocumentsAndLoaderReadsInPlace) {
  const std::string dir = test_dir();
  Megatron a = three_docs(), b;
  b.docs = {{{2, 3, 4, 5, 6, 7}}, {{8, 9, 1}}};  // 9 tokens: docs at 11, 17 of the stream
  a.write(dir + "/a");
  b.write(dir + "/b");
  keel::Config config = pretokenized_config(dir, "megatron", {dir + "/a", dir + "/b.idx"});
  const auto report = keel::data::prepare_data(config);
  ASSERT_EQ(report.sources.size(), 1u);
  EXPECT_FALSE(report.up_to_date);
  EXPECT_EQ(report.sources[0].tokens, 20);
  EXPECT_EQ(report.sources[0].documents, 5);
  EXPECT_EQ(report.sources[0].shards, 2);
  // No token was copied: the prepared directory holds the manifest and the document index only.
  std::vector<std::string> written;
  for (const auto& e : fs::recursive_directory_iterator(config.data.dir))
    if (e.is_regular_file()) written.push_back(fs::relative(e.path(), config.data.dir).string());
  std::sort(written.begin(), written.end());
  EXPECT_EQ(written, (std::vector<std::string>{"corpus/documents.bin", "prepared.json"}));
  const auto manifest = nlohmann::json::parse(std::ifstream(config.data.dir + "/prepared.json"));
  EXPECT_EQ(manifest["eos_id"], 1);
  EXPECT_EQ(manifest["sources"][0]["format"], "megatron");
  EXPECT_EQ(manifest["sources"][0]["files"].size(), 4u);  // a.idx, a.bin, b.idx, b.bin with sizes and mtimes
  EXPECT_EQ(manifest["sources"][0]["files"][1]["bytes"], 22);

  keel::data::DataLoader loader(config, 2);
  EXPECT_EQ(loader.source_tokens(0), 20);
  EXPECT_EQ(loader.samples_per_epoch(0), 4);                                      // (20 - 1) / 4
  EXPECT_EQ(loader.sample_tokens(0, 2), (std::vector<int32_t>{1, 12, 1, 2, 3}));  // across the two datasets
  const auto plan = loader.plan_next();
  const auto tokens = loader.tokens(plan, 0, 2);
  EXPECT_EQ(tokens.sizes(), (std::vector<int64_t>{2, 5}));
  const keel::data::DocumentIndex documents(loader.dir(), loader.source_names());
  const auto span = documents.span(0, 8, 5);  // tokens 8..12: doc 1 from its token 3, doc 2, doc 3
  EXPECT_EQ(span.first_doc, 1);
  EXPECT_EQ(span.first_doc_offset, 3);
  EXPECT_EQ(span.n_docs, 3);
  EXPECT_NE(error_of([&] { loader.decode({5}); }).find("pre-tokenized and has no tokenizer"), std::string::npos);

  // Idempotent; a file touched after prepare is noticed by training and prepared again.
  EXPECT_TRUE(keel::data::prepare_data(config).up_to_date);
  const std::string bin = dir + "/b.bin";
  fs::last_write_time(bin, fs::last_write_time(bin) + std::chrono::seconds(5));
  EXPECT_NE(error_of([&] { keel::data::DataLoader(config, 2); }).find(bin + ": changed since `keel data prepare`"),
            std::string::npos);
  EXPECT_FALSE(keel::data::prepare_data(config).up_to_date);
  EXPECT_NO_THROW(keel::data::DataLoader(config, 2));
  // Damage after prepare: training names the file and offset.
  Bytes damaged = b.bin();
  damaged[0] = 40;
  write_file(bin, damaged);
  EXPECT_NE(error_of([&] { keel::data::prepare_data(config); }).find(bin + ": offset 0: token id 40 >= vocab 16"),
            std::string::npos);
}

TEST(PretokenizedSource, NpySourceDocumentsAtEos) {
  const std::string dir = test_dir();
  numpy_write_all({{dir + "/p0.npy", "np.save(out, np.array([3, 4, 1, 5, 6, 7, 1, 8], dtype='<u2'))"},
                   {dir + "/p1.npy", "np.save(out, np.array([9, 1, 2, 1], dtype='<u4'))"}});
  keel::Config config = pretokenized_config(dir, "npy", {dir + "/p*.npy"});
  const auto report = keel::data::prepare_data(config);
  EXPECT_EQ(report.sources[0].tokens, 12);
  EXPECT_EQ(report.sources[0].documents, 4);  // [3 4 1] [5 6 7 1] [8 | 9 1] [2 1]
  keel::data::DataLoader loader(config, 1);
  const keel::data::DocumentIndex documents(loader.dir(), loader.source_names());
  EXPECT_EQ(documents.document_start(0, 2), 7);
  EXPECT_EQ(documents.document_start(0, 3), 10);
  EXPECT_EQ(loader.sample_tokens(0, 1), (std::vector<int32_t>{6, 7, 1, 8, 9}));
  // A raw file needs its dtype; a non-npy file without one is refused naming the key.
  Bytes raw;
  for (uint64_t t : {3, 1, 4, 1, 5}) put(raw, t, 2);
  write_file(dir + "/r.bin", raw);
  config.data.sources[0].inputs = {dir + "/r.bin"};
  EXPECT_NE(error_of([&] { keel::data::prepare_data(config); }).find("give source.corpus.dtype = uint16 or uint32"),
            std::string::npos);
  config.data.sources[0].dtype = "uint16";
  EXPECT_EQ(keel::data::prepare_data(config).sources[0].tokens, 5);
}

TEST(PretokenizedSource, Refusals) {
  const std::string dir = test_dir();
  three_docs().write(dir + "/a");
  keel::Config config = pretokenized_config(dir, "megatron", {dir + "/a"});
  config.data.eos_id = -1;
  EXPECT_NE(
      error_of([&] { keel::data::prepare_data(config); }).find("source corpus has format megatron: set data.eos_id"),
      std::string::npos);
  config.data.eos_id = 1;
  keel::SourceConfig text;
  text.name = "prose";
  text.inputs = {dir + "/a.idx"};
  config.data.sources.push_back(text);
  EXPECT_NE(error_of([&] {
              keel::data::prepare_data(config);
            }).find("source corpus (format megatron) and source prose (format text) do not share a tokenizer"),
            std::string::npos);
  config.data.sources.pop_back();
  config.data.sources[0].inputs = {dir + "/missing"};
  EXPECT_EQ(error_of([&] { keel::data::prepare_data(config); }),
            "source corpus: input " + dir + "/missing.idx does not exist");
  config.data.sources[0].inputs = {dir + "/nothing*"};
  EXPECT_NE(error_of([&] { keel::data::prepare_data(config); }).find("matches nothing"), std::string::npos);
}

TEST(PretokenizedSource, ConfigKeysWrittenOnlyWhenSet) {
  keel::Config config = keel::parse_config_text("[model]\nvocab = 64\n[source.prose]\ninputs = /tmp/x\n", "a.ini");
  const std::string plain = keel::to_ini(config);
  EXPECT_EQ(plain.find("format"), std::string::npos);  // configs without the keys hash as before
  EXPECT_EQ(plain.find("eos_id"), std::string::npos);
  EXPECT_EQ(plain.find("dtype"), std::string::npos);
  keel::Config pre = keel::parse_config_text(
      "[model]\nvocab = 64\n[data]\neos_id = 2\n[source.toks]\nformat = npy\ndtype = uint32\ninputs = /tmp/x\n",
      "b.ini");
  EXPECT_EQ(pre.data.eos_id, 2);
  EXPECT_EQ(pre.data.sources[0].format, "npy");
  EXPECT_EQ(pre.data.sources[0].dtype, "uint32");
  const std::string ini = keel::to_ini(pre);
  EXPECT_NE(ini.find("eos_id = 2"), std::string::npos);
  EXPECT_NE(ini.find("format = npy"), std::string::npos);
  const keel::Config back = keel::parse_config_text(ini, "c.ini");
  EXPECT_EQ(keel::to_ini(back), ini);
  EXPECT_THROW(keel::parse_config_text("[source.t]\nformat = parquet\ninputs = /x\n", "d.ini"), keel::ConfigError);
  EXPECT_THROW(keel::parse_config_text("[source.t]\ndtype = uint32\ninputs = /x\n", "e.ini"), keel::ConfigError);
  EXPECT_THROW(keel::parse_config_text("[model]\nvocab = 64\n[data]\neos_id = 64\n", "f.ini"), keel::ConfigError);
  bool listed = false;
  for (const auto& [key, doc] : keel::documented_keys()) listed |= key == "source.NAME.format" || key == "data.eos_id";
  EXPECT_TRUE(listed);
}

TEST(JsonlTokens, ParsesLinesAndRefusesBadOnesNamingTheLine) {
  EXPECT_EQ(
      keel::data::parse_jsonl_tokens("c.jsonl", "{\"token_ids\": [3, 1, 4]}\n\n{\"token_ids\": [1], \"x\": 2}", 5),
      (std::vector<int32_t>{3, 1, 4, 1}));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"token_ids\": [1]}\n{\"token_ids\": [1,\n", "c.jsonl: line 2: not JSON"},
      {"{\"tokens\": [1]}", "c.jsonl: line 1: no \"token_ids\" array"},
      {"[1, 2]", "c.jsonl: line 1: no \"token_ids\" array"},
      {"{\"token_ids\": [1, 2.5]}", "c.jsonl: line 1: token_ids[1] = 2.5 is not an integer"},
      {"\n{\"token_ids\": [1, 5]}", "c.jsonl: line 2: token_ids[1] = 5 >= vocab 5"},
      {"{\"token_ids\": [-1]}", "c.jsonl: line 1: token_ids[0] = -1 < 0"},
      {"{\"token_ids\": [18446744073709551615]}", "c.jsonl: line 1: token_ids[0] = 18446744073709551615 >= vocab 5"},
  };
  for (const auto& [text, expect] : cases) {
    const std::string message = error_of([&] { keel::data::parse_jsonl_tokens("c.jsonl", text, 5); });
    EXPECT_EQ(message.rfind(expect, 0), 0u) << message;
  }
}

TEST(PretokenizedSource, JsonlTokensParsedOnceIntoACache) {
  const std::string dir = test_dir();
  std::ofstream(dir + "/a.jsonl") << "{\"token_ids\": [3, 4, 1, 5]}\n{\"token_ids\": [6, 7, 1]}\n";
  numpy_write_all(
      {{dir + "/b.jsonl.gz", "import gzip\ngzip.open(out, 'wt').write('{\"token_ids\": [8, 1, 9, 10, 1]}\\n')"}});
  keel::Config config = pretokenized_config(dir, "jsonl-tokens", {dir + "/a.jsonl", dir + "/b.jsonl.gz"});
  const auto report = keel::data::prepare_data(config);
  EXPECT_EQ(report.sources[0].tokens, 12);
  EXPECT_EQ(report.sources[0].documents, 4);  // [3 4 1] [5 6 7 1] [8 1] [9 10 1]
  EXPECT_TRUE(fs::exists(config.data.dir + "/corpus/cache-00001.bin"));
  keel::data::DataLoader loader(config, 1);
  EXPECT_EQ(loader.sample_tokens(0, 1), (std::vector<int32_t>{6, 7, 1, 8, 1}));
  const keel::data::DocumentIndex documents(loader.dir(), loader.source_names());
  EXPECT_EQ(documents.document_start(0, 3), 9);
  EXPECT_TRUE(keel::data::prepare_data(config).up_to_date);
  // A damaged cache is rebuilt from the input; a bad line names the file and line.
  std::ofstream(config.data.dir + "/corpus/cache-00000.bin") << "GARBAGE!";
  EXPECT_FALSE(keel::data::prepare_data(config).up_to_date);
  EXPECT_EQ(keel::data::DataLoader(config, 1).sample_tokens(0, 0), (std::vector<int32_t>{3, 4, 1, 5, 6}));
  std::ofstream(dir + "/a.jsonl") << "{\"token_ids\": [3, 4, 1, 5]}\n{\"token_ids\": [16]}\n";
  EXPECT_EQ(error_of([&] { keel::data::prepare_data(config); }),
            dir + "/a.jsonl: line 2: token_ids[0] = 16 >= vocab 16");
  std::ofstream(dir + "/b.jsonl.gz") << "not gzip";
  config.data.sources[0].inputs = {dir + "/b.jsonl.gz"};
  EXPECT_NE(error_of([&] { keel::data::prepare_data(config); }).find(dir + "/b.jsonl.gz: gzip -dc failed"),
            std::string::npos);
}

TEST(PretokenizedSource, HeldOutDocumentsStayInTheFilesAndOutOfTraining) {
  const std::string dir = test_dir();
  Megatron a = three_docs(), b;
  b.docs = {{{2, 3, 4, 5, 6, 7}}, {{8, 9, 1}}};  // docs 3 and 4 at tokens 11 and 17 of the stream
  a.write(dir + "/a");
  b.write(dir + "/b");
  keel::Config config = pretokenized_config(dir, "megatron", {dir + "/a", dir + "/b"});
  config.data.sources[0].heldout = 2;  // of 5 documents: ids floor((2i + 1) * 5 / 4) = 1 and 3
  const auto report = keel::data::prepare_data(config);
  EXPECT_EQ(report.sources[0].documents, 3);
  EXPECT_EQ(report.sources[0].heldout_documents, 2);
  EXPECT_EQ(report.sources[0].tokens, 10);
  std::vector<std::string> written;  // still no token copied
  for (const auto& e : fs::recursive_directory_iterator(config.data.dir))
    if (e.is_regular_file()) written.push_back(fs::relative(e.path(), config.data.dir).string());
  std::sort(written.begin(), written.end());
  EXPECT_EQ(written, (std::vector<std::string>{"corpus/documents.bin", "prepared.json"}));
  const auto manifest = nlohmann::json::parse(std::ifstream(config.data.dir + "/prepared.json"));
  const auto& held = manifest["sources"][0]["heldout"];
  EXPECT_EQ(held["documents"], 2);
  EXPECT_EQ(held["document_ids"], nlohmann::json({1, 3}));
  EXPECT_EQ(held["tokens"], 10);
  EXPECT_EQ(held["ranges"], nlohmann::json({{5, 9}, {11, 17}}));  // doc 1 in a, doc 3 in b

  // Training reads docs 0, 2, 4 only: [5 6 7 8 1] [12 1] [8 9 1], renumbered 0, 1, 2.
  keel::data::DataLoader loader(config, 1);
  EXPECT_EQ(loader.source_tokens(0), 10);
  EXPECT_EQ(loader.samples_per_epoch(0), 2);
  EXPECT_EQ(loader.sample_tokens(0, 0), (std::vector<int32_t>{5, 6, 7, 8, 1}));
  EXPECT_EQ(loader.sample_tokens(0, 1), (std::vector<int32_t>{1, 12, 1, 8, 9}));
  const keel::data::DocumentIndex documents(loader.dir(), loader.source_names());
  EXPECT_EQ(documents.document_start(0, 1), 5);
  EXPECT_EQ(documents.document_start(0, 2), 7);
  // The held-out set: docs 1 and 3, read from the same files.
  const auto set = keel::data::read_heldout(config.data.dir, "corpus", 100);
  ASSERT_TRUE(set.has_value());
  EXPECT_EQ(set->documents, 2);
  EXPECT_EQ(set->tokens, 10);
  EXPECT_EQ(set->head, (std::vector<int32_t>{9, 10, 11, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(keel::data::read_heldout(config.data.dir, "corpus", 3)->head, (std::vector<int32_t>{9, 10, 11}));
  EXPECT_TRUE(keel::data::prepare_data(config).up_to_date);

  // The setting is part of the fingerprint: another one prepares again; the default share holds out one of five.
  config.data.sources[0].heldout = -1;
  const auto by_default = keel::data::prepare_data(config);
  EXPECT_FALSE(by_default.up_to_date);
  EXPECT_EQ(by_default.sources[0].heldout_documents, 1);  // doc floor(5 / 2) = 2: [12 1]
  EXPECT_EQ(keel::data::read_heldout(config.data.dir, "corpus", 100)->head, (std::vector<int32_t>{12, 1}));
  EXPECT_EQ(keel::data::DataLoader(config, 1).source_tokens(0), 18);
  // heldout = 0: the files whole, no held-out set; a count that leaves nothing to train on is refused.
  config.data.sources[0].heldout = 0;
  EXPECT_EQ(keel::data::prepare_data(config).sources[0].tokens, 20);
  EXPECT_FALSE(keel::data::read_heldout(config.data.dir, "corpus", 100).has_value());
  config.data.sources[0].heldout = 5;
  EXPECT_NE(error_of([&] { keel::data::prepare_data(config); }).find("source.corpus.heldout = 5 but the source has 5"),
            std::string::npos);

  // A damaged range in prepared.json is named when training opens the source.
  config.data.sources[0].heldout = 2;
  keel::data::prepare_data(config);
  auto damaged = nlohmann::json::parse(std::ifstream(config.data.dir + "/prepared.json"));
  damaged["sources"][0]["heldout"]["ranges"] = nlohmann::json({{5, 9}, {8, 17}});
  std::ofstream(config.data.dir + "/prepared.json") << damaged.dump();
  EXPECT_NE(error_of([&] { keel::data::DataLoader(config, 1); }).find("prepared.json heldout range [8,17]"),
            std::string::npos);
}

TEST(PretokenizedSource, HeldOutNpyDocumentMaySpanTwoFiles) {
  const std::string dir = test_dir();
  numpy_write_all({{dir + "/p0.npy", "np.save(out, np.array([3, 4, 1, 5, 6, 7, 1, 8], dtype='<u2'))"},
                   {dir + "/p1.npy", "np.save(out, np.array([9, 1, 2, 1], dtype='<u4'))"}});
  keel::Config config = pretokenized_config(dir, "npy", {dir + "/p*.npy"});
  config.data.sources[0].heldout = 1;  // of 4 documents: id floor(4 / 2) = 2, [8 | 9 1] across the two files
  const auto report = keel::data::prepare_data(config);
  EXPECT_EQ(report.sources[0].tokens, 9);
  EXPECT_EQ(report.sources[0].documents, 3);
  keel::data::DataLoader loader(config, 1);
  EXPECT_EQ(loader.sample_tokens(0, 1), (std::vector<int32_t>{6, 7, 1, 2, 1}));
  EXPECT_EQ(keel::data::read_heldout(config.data.dir, "corpus", 100)->head, (std::vector<int32_t>{8, 9, 1}));
}

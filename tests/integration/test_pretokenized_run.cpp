// Why: the user's path for a corpus someone else tokenized, end to end through the `keel` binary: a config with a
// Megatron source (.bin/.idx written byte by byte as Megatron-LM's indexed_dataset.py lays them out) and an npy
// source (written by numpy), `keel data prepare` (validates, records, copies no token), a few training steps at
// tiny shapes, the /data/batch record naming the right documents (checked against the test's own document
// boundaries), and `keel data show-batch --run` equal to that record. Each source holds documents out
// (source.NAME.heldout, chosen by the documented rule, computed here independently): their tokens (a marker id no
// other document uses) appear in no training sample, and `keel eval` measures on them with seen_in_training = 0.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using nlohmann::json;
using namespace keel::testing;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kVocab = 64, kEos = 1, kSeq = 16, kMarker = kVocab - 1;

void put(std::string& b, uint64_t v, int width) {
  for (int i = 0; i < width; ++i) b.push_back(static_cast<char>(v >> (8 * i)));
}

// The documents source.NAME.heldout = `held` keeps out of `count` (docs/data.md): floor((2i + 1) count / 2 held).
std::set<int64_t> heldout_ids(int64_t held, int64_t count) {
  std::set<int64_t> ids;
  for (int64_t i = 0; i < held; ++i) ids.insert((2 * i + 1) * count / (2 * held));
  return ids;
}

// Deterministic documents of ids in [2, kMarker), each ending with EOS; lengths 5..40. The held-out ones are
// kMarker ... kMarker EOS instead.
std::vector<std::vector<int64_t>> make_documents(int count, uint64_t seed, const std::set<int64_t>& held = {}) {
  std::vector<std::vector<int64_t>> docs;
  uint64_t x = seed;
  auto next = [&] { return x = x * 6364136223846793005ULL + 1442695040888963407ULL, x >> 33; };
  for (int d = 0; d < count; ++d) {
    std::vector<int64_t> doc(5 + next() % 36);
    for (auto& t : doc) t = held.count(d) ? kMarker : 2 + static_cast<int64_t>(next() % (kMarker - 2));
    doc.back() = kEos;
    docs.push_back(doc);
  }
  return docs;
}

// The documents training sees, in order.
std::vector<std::vector<int64_t>> without(const std::vector<std::vector<int64_t>>& docs,
                                          const std::set<int64_t>& held) {
  std::vector<std::vector<int64_t>> out;
  for (size_t d = 0; d < docs.size(); ++d)
    if (!held.count(static_cast<int64_t>(d))) out.push_back(docs[d]);
  return out;
}

std::vector<int64_t> concat(const std::vector<std::vector<int64_t>>& docs) {
  std::vector<int64_t> out;
  for (const auto& d : docs) out.insert(out.end(), d.begin(), d.end());
  return out;
}

// PREFIX.idx + PREFIX.bin as Megatron writes them (uint16, dtype code 8; one sequence per document).
void write_megatron(const std::string& prefix, const std::vector<std::vector<int64_t>>& docs) {
  std::string idx("MMIDIDX\0\0", 9), bin;
  put(idx, 1, 8);
  idx.push_back(8);
  put(idx, docs.size(), 8);
  put(idx, docs.size() + 1, 8);
  for (const auto& d : docs) put(idx, d.size(), 4);
  int64_t pointer = 0;
  for (const auto& d : docs) put(idx, static_cast<uint64_t>(pointer), 8), pointer += 2 * d.size();
  for (size_t k = 0; k <= docs.size(); ++k) put(idx, k, 8);
  for (const auto& d : docs)
    for (int64_t t : d) put(bin, static_cast<uint64_t>(t), 2);
  std::ofstream(prefix + ".idx", std::ios::binary) << idx;
  std::ofstream(prefix + ".bin", std::ios::binary) << bin;
}

std::vector<int64_t> starts_of(const std::vector<std::vector<int64_t>>& docs) {
  std::vector<int64_t> starts;
  int64_t at = 0;
  for (const auto& d : docs) starts.push_back(at), at += static_cast<int64_t>(d.size());
  return starts;
}

}  // namespace

TEST(PretokenizedRun, MegatronAndNpySourcesPrepareTrainRecordAndShowBatch) {
  const std::string dir = fresh_dir("pretokenized"), run = dir + "/run";
  fs::create_directories(dir);
  const std::set<int64_t> meg_held = heldout_ids(6, 120), npy_held = heldout_ids(5, 100);  // heldout = 6, 0.05
  const auto meg_docs = make_documents(120, 7, meg_held), npy_docs = make_documents(100, 11, npy_held);
  write_megatron(dir + "/meg_text_document", meg_docs);
  {
    std::ofstream py(dir + "/write.py");
    py << "import numpy as np\nnp.save('" << dir << "/toks.npy', np.array([";
    for (const auto& d : npy_docs)
      for (int64_t t : d) py << t << ",";
    py << "], dtype='<u4'))\n";
  }
  ASSERT_EQ(std::system(("/usr/bin/python3 " + dir + "/write.py").c_str()), 0);
  const std::string config = dir + "/pre.ini";
  std::ofstream(config) << "[model]\nlayers = 1\nd_model = 32\nheads = 2\nkv_heads = 1\nffn_hidden = 64\nvocab = "
                        << kVocab << "\nseq_len = " << kSeq
                        << "\n[train]\nsteps = 4\nmicro_batch = 4\ngrad_accum = 1\nthreads = 1\nlog_every = 1\n"
                           "[optim]\nwarmup_steps = 1\ndecay_steps = 4\n"
                           "[data]\ndir = prepared\neos_id = 1\nmixture = meg=0.5,toks=0.5\nchunks = 4\n"
                           "[checkpoint]\nevery = 2\n"
                           "[source.meg]\nformat = megatron\ninputs = meg_text_document\nheldout = 6\n"
                           "[source.toks]\nformat = npy\ninputs = toks.npy\nheldout = 0.05\n";

  auto r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/prepared/meg/shard-00000.bin")) << "tokens were copied";
  const json manifest = json::parse(std::ifstream(dir + "/prepared/prepared.json"));
  EXPECT_EQ(manifest.at("sources").at(0).at("documents"), 114);
  EXPECT_EQ(manifest.at("sources").at(1).at("documents"), 95);
  EXPECT_EQ(manifest.at("sources").at(0).at("heldout").at("document_ids"), json(meg_held));
  EXPECT_EQ(manifest.at("sources").at(1).at("heldout").at("document_ids"), json(npy_held));
  r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("up to date"), std::string::npos) << r.output;

  r = run_keel("train --config " + config + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // Each recorded sample names the documents its window covers, from the test's own boundaries.
  const MetricsReader reader(run + "/metrics.h5");
  const auto names = reader.batch_sources();
  const std::map<std::string, std::vector<int64_t>> starts = {{"meg", starts_of(without(meg_docs, meg_held))},
                                                              {"toks", starts_of(without(npy_docs, npy_held))}};
  const std::map<std::string, std::vector<int64_t>> streams = {{"meg", concat(without(meg_docs, meg_held))},
                                                               {"toks", concat(without(npy_docs, npy_held))}};
  const auto batches = reader.read_batches_by_step();
  ASSERT_EQ(batches.size(), 4u);
  for (const auto& [step, rows] : batches) {
    ASSERT_EQ(rows.size(), 4u);
    for (const auto& row : rows) {
      const auto& s = starts.at(names.at(static_cast<size_t>(row.source)));
      const int64_t begin = row.sample_id * kSeq, end = begin + kSeq + 1;
      const auto first = std::upper_bound(s.begin(), s.end(), begin) - 1;
      const auto last = std::lower_bound(s.begin(), s.end(), end);
      EXPECT_EQ(row.first_doc, first - s.begin()) << "step " << step;
      EXPECT_EQ(row.first_doc_offset, begin - *first) << "step " << step;
      EXPECT_EQ(row.n_docs, last - first) << "step " << step;
    }
  }

  // show-batch --run equals the record, and shows each whole window: the test's stream without the held-out
  // documents, so no held-out token (the marker) is in any training sample.
  r = run_keel("data show-batch --run " + run + " --step " + std::to_string(batches.begin()->first) + " --to " +
               std::to_string(batches.rbegin()->first) + " --json --tokens " + std::to_string(kSeq + 1));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::istringstream lines(r.output);
  int steps = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("{", 0) != 0) continue;
    const json shown = json::parse(line);
    const auto& rows = batches.at(shown.at("step").get<int64_t>());
    ASSERT_EQ(shown.at("samples").size(), rows.size());
    for (size_t k = 0; k < rows.size(); ++k) {
      const json& s = shown.at("samples")[k];
      EXPECT_EQ(s.at("source"), names.at(static_cast<size_t>(rows[k].source)));
      EXPECT_EQ(s.at("sample_id"), rows[k].sample_id);
      EXPECT_EQ(s.at("first_doc"), rows[k].first_doc);
      EXPECT_EQ(s.at("n_docs"), rows[k].n_docs);
      const auto& stream = streams.at(s.at("source").get<std::string>());
      const auto begin = stream.begin() + rows[k].sample_id * kSeq;
      EXPECT_EQ(s.at("tokens"), json(std::vector<int64_t>(begin, begin + kSeq + 1)));
      for (const auto& t : s.at("tokens")) EXPECT_NE(t, kMarker) << "a held-out token in step " << shown.at("step");
    }
    ++steps;
  }
  EXPECT_EQ(steps, 4);

  // keel eval: the held-out documents by default, never seen in training.
  r = run_keel("eval " + run + " --batches 1 --memorization-samples 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const size_t brace = r.output.rfind('{', 0) == 0 ? 0 : r.output.find("\n{") + 1;  // after the log lines
  const json evaluated = json::parse(r.output.substr(brace));
  EXPECT_EQ(evaluated.at("split"), "heldout") << r.output;
  for (const char* source : {"meg", "toks"}) {
    const json& row = evaluated.at("sources").at(source);
    EXPECT_EQ(row.at("seen_in_training"), 0) << source;
    EXPECT_GE(row.at("samples"), 1) << source;
    EXPECT_TRUE(std::isfinite(row.at("nll").get<double>())) << source;
  }
  // The text form says the ids cannot be decoded rather than failing.
  r = run_keel("data show-batch --config " + config + " --step 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("pre-tokenized and has no tokenizer"), std::string::npos) << r.output;
}

TEST(PretokenizedRun, MixingWithTextAndMissingEosAreOneLineErrors) {
  const std::string dir = fresh_dir("pretokenized-bad");
  fs::create_directories(dir);
  write_megatron(dir + "/m", make_documents(10, 3));
  const std::string config = dir + "/bad.ini";
  std::ofstream(config) << "[model]\nvocab = 64\nseq_len = 16\n[data]\ndir = prepared\n"
                           "[source.meg]\nformat = megatron\ninputs = m\n";
  auto r = run_keel("data prepare --config " + config);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("source meg has format megatron: set data.eos_id"), std::string::npos) << r.output;
  r = run_keel("data prepare --config " + config + " --set data.eos_id=1 --set source.prose.inputs=" + config);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("source meg (format megatron) and source prose (format text) do not share a tokenizer"),
            std::string::npos)
      << r.output;
}

// Why: the held-out split end to end (docs/data.md#the-held-out-split, docs/eval.md): `keel data prepare` keeps
// the documents source.NAME.heldout names out of the training shards and writes them apart; a run never trains on
// them (every sample of every step's /data/batch record is decoded and searched for the held-out documents'
// markers); `keel eval` measures on them by default with seen_in_training = 0, keeps --split train-tail, and
// `keel eval --all` writes the curve of every checkpoint that `keel report` shows. Each document carries a unique
// marker, so "never trained on" is checked on the text itself, not on Keel's own bookkeeping.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/checkpoint/h5_file.h"
#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/data/loader.h"
#include "core/data/shard.h"
#include "core/data/tokenizer.h"
#include "core/eval/eval.h"
#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using namespace keel::testing;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr int kDocuments = 60;

std::string marker(int doc) { return "qz" + std::to_string(1000 + doc) + "zq"; }

// kDocuments fortune-style documents ("%" lines between them), each a unique marker and ~40 words.
std::string write_corpus(const std::string& dir) {
  static const char* const kWords[] = {"the",   "river", "stone",  "quiet", "morning", "light", "carries",
                                       "over",  "a",     "field",  "of",    "green",   "wind",  "slowly",
                                       "under", "old",   "bridge", "birds", "sing",    "and",   "rain"};
  std::string text;
  uint32_t state = 12345;
  for (int d = 0; d < kDocuments; ++d) {
    text += "Entry " + marker(d) + ":";
    for (int w = 0; w < 40; ++w) {
      state = state * 1664525u + 1013904223u;
      text += std::string(" ") + kWords[(state >> 16) % (sizeof kWords / sizeof kWords[0])];
    }
    text += ".\n%\n";
  }
  fs::create_directories(dir);
  const std::string path = dir + "/notes.txt";
  std::ofstream(path) << text;
  return path;
}

std::string write_config(const std::string& dir, const std::string& corpus, const std::string& heldout) {
  const std::string path = dir + "/heldout.ini";
  std::ofstream(path) << "[model]\nlayers = 2\nd_model = 32\nheads = 2\nkv_heads = 2\nffn_hidden = 64\nvocab = 512\n"
                         "seq_len = 32\n[train]\nsteps = 6\nmicro_batch = 4\ngrad_accum = 1\nseed = 1\n"
                         "precision = fp32\nthreads = 1\n[optim]\nlr = 3e-3\nwarmup_steps = 1\n[data]\ndir = data\n"
                         "seed = 7\nchunks = 4\ntokenizer_sample_mb = 1\n[checkpoint]\nevery = 3\n[source.notes]\n"
                         "inputs = "
                      << corpus << "\nsplit = fortune\n"
                      << (heldout.empty() ? "" : "heldout = " + heldout + "\n");
  return path;
}

std::string decode_shards(const json& shards, const std::string& data_dir, const keel::data::Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (const auto& s : shards) {
    const auto part = keel::data::ShardReader(data_dir + "/" + s.at("file").get<std::string>(), 512).read_all();
    ids.insert(ids.end(), part.begin(), part.end());
  }
  return tokenizer.decode(ids);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

json last_json(const std::string& output) {  // the JSON object a command printed after its log lines
  const auto brace = output.find("\n{");
  return json::parse(output.rfind('{', 0) == 0 ? output : output.substr(brace + 1));
}

}  // namespace

TEST(HeldoutEval, PrepareKeepsHeldOutDocumentsOutOfEveryTrainingStep) {
  const std::string root = fresh_dir("heldout");
  const std::string config = write_config(root, write_corpus(root + "/corpus"), "6");
  const std::string data = root + "/data", run = root + "/run";
  auto r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("6 of 60 documents held out"), std::string::npos) << r.output;

  // prepared.json: six documents spread evenly, in files of their own, and the training index without them.
  const json source = read_json(data + "/prepared.json").at("sources").at(0);
  ASSERT_TRUE(source.contains("heldout")) << source.dump(2);
  const json& heldout = source.at("heldout");
  EXPECT_EQ(heldout.at("documents"), 6);
  EXPECT_EQ(heldout.at("document_ids"), json({5, 15, 25, 35, 45, 55}));
  EXPECT_EQ(source.at("documents"), kDocuments - 6);
  EXPECT_EQ(source.at("document_index").at("documents"), kDocuments - 6);
  ASSERT_EQ(heldout.at("shards").size(), 1u);
  EXPECT_EQ(heldout.at("shards").at(0).at("file"), "notes/heldout-00000.bin");

  const keel::data::Tokenizer tokenizer(data + "/tokenizer.model");
  const std::string trained_text = decode_shards(source.at("shards"), data, tokenizer);
  const std::string heldout_text = decode_shards(heldout.at("shards"), data, tokenizer);
  std::set<int> held;
  for (const auto& id : heldout.at("document_ids")) held.insert(id.get<int>());
  for (int d = 0; d < kDocuments; ++d) {
    const bool in_train = trained_text.find(marker(d)) != std::string::npos;
    const bool in_heldout = heldout_text.find(marker(d)) != std::string::npos;
    EXPECT_EQ(in_train, held.count(d) == 0) << "document " << d;
    EXPECT_EQ(in_heldout, held.count(d) == 1) << "document " << d;
  }

  // A second prepare with nothing changed does nothing (the held-out setting is part of the fingerprint).
  r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("up to date"), std::string::npos) << r.output;

  // Train; every sample of every recorded step, decoded, holds no held-out document's marker.
  r = run_keel("train --config " + config + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const keel::metrics::MetricsReader reader(run + "/metrics.h5");
  const auto batches = reader.read_batches_by_step();
  ASSERT_EQ(batches.size(), 6u);
  const keel::Config cfg = keel::load_config(run + "/config.ini");
  const keel::data::DataLoader loader(cfg, cfg.global_batch());
  size_t samples = 0;
  for (const auto& [step, rows] : batches) {
    for (const auto& row : rows) {
      const std::string text = loader.decode(loader.sample_tokens(static_cast<int32_t>(row.source), row.sample_id));
      for (int d : held) EXPECT_EQ(text.find(marker(d)), std::string::npos) << "step " << step << ": " << text;
      ++samples;
    }
  }
  EXPECT_EQ(samples, 6u * 4u);

  // keel eval: the held-out split by default, never seen in training.
  r = run_keel("eval " + run + " --batches 1 --memorization-samples 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  json j = last_json(r.output);
  EXPECT_EQ(j.at("split"), "heldout");
  const json& notes = j.at("sources").at("notes");
  EXPECT_EQ(notes.at("seen_in_training"), 0);
  EXPECT_EQ(notes.at("samples"), 4);
  EXPECT_TRUE(std::isfinite(notes.at("nll").get<double>()));
  const keel::checkpoint::H5Reader h5(run + "/eval/step-00000006.h5");
  EXPECT_EQ(h5.string_attribute("/", "split"), "heldout");

  // The old behaviour, by name; a bad split is refused naming the choices.
  r = run_keel("eval " + run + " --split train-tail --out " + root +
               "/tail.h5 --batches 1 --memorization-samples 0 "
               "--json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_json(r.output).at("split"), "train-tail");
  r = run_keel("eval " + run + " --split validation --out " + root + "/bad.h5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--split must be heldout, train-tail or auto, got 'validation'"), std::string::npos)
      << r.output;

  // The held-out windows: consecutive seq_len + 1 tokens of the held-out stream; too short a set is refused.
  const auto windows = keel::eval::heldout_windows(data, "notes", 32, 1000);
  const auto stream = keel::data::ShardReader(data + "/notes/heldout-00000.bin", 512).read_all();
  ASSERT_EQ(static_cast<int64_t>(windows.size()), (static_cast<int64_t>(stream.size()) - 1) / 32);
  EXPECT_EQ(windows.at(1), std::vector<int32_t>(stream.begin() + 32, stream.begin() + 65));
  try {
    keel::eval::heldout_windows(data, "notes", 1000000, 1);
    ADD_FAILURE() << "a held-out set shorter than one window was accepted";
  } catch (const keel::data::DataError& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than one eval sample"), std::string::npos) << e.what();
  }
}

TEST(HeldoutEval, EvalAllWritesACurveThatTheReportShows) {
  const std::string root = fresh_dir("heldout-all");
  const std::string config = write_config(root, write_corpus(root + "/corpus"), "0.1");
  const std::string run = root + "/run";
  auto r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train --config " + config + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  r = run_keel("eval --all " + run + " --batches 1 --memorization-samples 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = last_json(r.output);
  EXPECT_EQ(j.at("split"), "heldout");
  ASSERT_EQ(j.at("checkpoints").size(), 2u) << j.dump(2);  // steps 3 and 6
  EXPECT_EQ(j.at("checkpoints").at(0).at("step"), 3);
  EXPECT_EQ(j.at("checkpoints").at(1).at("step"), 6);
  const std::string curve = run + "/eval/curve.h5";
  ASSERT_EQ(j.at("out"), fs::weakly_canonical(curve).string());
  {
    const keel::checkpoint::H5Reader h5(curve);
    EXPECT_EQ(h5.string_attribute("/", "format"), "keel-eval-curve");
    EXPECT_EQ(h5.string_attribute("/", "split"), "heldout");
    const auto steps = h5.read_tensor("/step");
    ASSERT_EQ(steps.bytes.size(), 2 * sizeof(int64_t));
    std::vector<double> nll(2);
    std::memcpy(nll.data(), h5.read_tensor("/validation/notes/nll").bytes.data(), 2 * sizeof(double));
    for (size_t i = 0; i < 2; ++i) {
      EXPECT_DOUBLE_EQ(nll[i], j.at("checkpoints").at(i).at("sources").at("notes").at("nll").get<double>());
      EXPECT_EQ(j.at("checkpoints").at(i).at("sources").at("notes").at("seen_in_training"), 0);
    }
  }
  // Run again later: the curve is replaced by a complete one.
  r = run_keel("eval --all " + run + " --batches 1 --memorization-samples 0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("(2 checkpoints)"), std::string::npos) << r.output;
  // A checkpoint is not a run dir.
  r = run_keel("eval --all " + run + "/checkpoints/step-00000006");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--all takes a RUN_DIR"), std::string::npos) << r.output;

  // keel report reads the curve: both steps are the run's evals, from curve.h5.
  r = run_keel("report " + run + " -o " + root + "/report.html --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream page(root + "/report.html");
  const std::string html((std::istreambuf_iterator<char>(page)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("curve.h5"), std::string::npos);
  EXPECT_NE(html.find("chart-eval"), std::string::npos);
}

TEST(HeldoutEval, DataWithoutAHeldOutSetFallsBackToTrainTailOrIsRefusedByName) {
  const std::string root = fresh_dir("heldout-none");
  const std::string config = write_config(root, write_corpus(root + "/corpus"), "0");
  const std::string run = root + "/run";
  auto r = run_keel("data prepare --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("train --config " + config + " --set train.steps=2 --set checkpoint.every=0 --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(read_json(root + "/data/prepared.json").at("sources").at(0).contains("heldout"));

  r = run_keel("eval " + run + " --batches 1 --memorization-samples 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(last_json(r.output).at("split"), "train-tail");
  EXPECT_NE(r.output.find("source notes in " + root + "/data has no held-out set"), std::string::npos) << r.output;

  r = run_keel("eval " + run + " --split heldout --out " + root + "/x.h5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("has no held-out set (source.notes.heldout = 0"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(root + "/x.h5"));
}

// Why: `keel eval` end to end, as a user runs it: train tiny for a few steps with a checkpoint, evaluate the
// run dir (default output RUN_DIR/eval/step-XXXXXXXX.h5, never inside the checkpoint) and read the HDF5 file
// back: every documented field present, perplexities finite and below the vocabulary size, scores in [0, 1],
// the eval samples' overlap with training reported, and bad paths refused with the path named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/h5_file.h"
#include "keel_process.h"

using namespace keel::testing;
using keel::checkpoint::H5Reader;
using keel::checkpoint::RawTensor;
namespace fs = std::filesystem;

namespace {

template <typename T>
std::vector<T> values(const RawTensor& t) {
  std::vector<T> out(t.bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  return out;
}

}  // namespace

TEST(EvalRun, EvaluatesATrainedCheckpointIntoTheRunDir) {
  const std::string run = fresh_dir("eval");
  auto r = run_keel("train --config " + tiny_config() + " " + test_data_override() +
                    " --set train.steps=10 --set checkpoint.every=10 --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  r = run_keel("eval " + run + " --batches 2 --memorization-samples 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("perplexity"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("memorization (k = 32, l = 32)"), std::string::npos) << r.output;
  const std::string out = run + "/eval/step-00000010.h5";
  ASSERT_TRUE(fs::exists(out)) << r.output;
  // The checkpoint itself is untouched (its manifest still verifies).
  EXPECT_NO_THROW(keel::checkpoint::verify_checkpoint_dir(run + "/checkpoints/step-00000010"));

  const H5Reader h5(out);
  EXPECT_EQ(h5.int_attribute("/", "step"), 10);
  EXPECT_EQ(h5.int_attribute("/", "k"), 32);
  EXPECT_EQ(h5.int_attribute("/", "l"), 32);
  EXPECT_NE(h5.string_attribute("/", "checkpoint_dir").find("step-00000010"), std::string::npos);
  const auto names = nlohmann::json::parse(h5.read_text("/source_names"));
  ASSERT_EQ(names, nlohmann::json({"prose", "code"}));
  for (const auto& name : names) {
    const std::string g = "/validation/" + name.get<std::string>();
    const double nll = values<double>(h5.read_tensor(g + "/nll")).at(0);
    const double ppl = values<double>(h5.read_tensor(g + "/perplexity")).at(0);
    EXPECT_TRUE(std::isfinite(nll)) << g;
    EXPECT_NEAR(ppl, std::exp(nll), 1e-9 * ppl) << g;
    EXPECT_GT(ppl, 1.0) << g;
    EXPECT_LT(ppl, 2048.0) << g;  // tiny's vocab: a trained model beats uniform
    EXPECT_EQ(values<int64_t>(h5.read_tensor(g + "/tokens")).at(0), 2 * 8 * 64) << g;   // 2 batches x 8 x T
    EXPECT_EQ(values<int64_t>(h5.read_tensor(g + "/seen_in_training")).at(0), 0) << g;  // 10 steps never reach the tail
    EXPECT_EQ(values<double>(h5.read_tensor(g + "/sample_nll")).size(), 16u) << g;
  }
  const auto scores = values<double>(h5.read_tensor("/memorization/score"));
  const auto sources = values<int32_t>(h5.read_tensor("/memorization/source"));
  const auto chunks = values<int64_t>(h5.read_tensor("/memorization/chunk"));
  const auto ids = values<int64_t>(h5.read_tensor("/memorization/sample_id"));
  ASSERT_FALSE(scores.empty());
  EXPECT_EQ(sources.size(), scores.size());
  EXPECT_EQ(chunks.size(), scores.size());
  EXPECT_EQ(ids.size(), scores.size());
  EXPECT_LE(scores.size(), 2u * 2u);  // 10 steps x 16 samples sit in chunk 0 of each source: 2 per (source, chunk)
  for (size_t i = 0; i < scores.size(); ++i) {
    EXPECT_GE(scores[i], 0.0);
    EXPECT_LE(scores[i], 1.0);
    EXPECT_TRUE(sources[i] == 0 || sources[i] == 1);
    EXPECT_GE(chunks[i], 0);
    EXPECT_LT(chunks[i], 36);
  }
  EXPECT_EQ(values<int64_t>(h5.read_tensor("/memorization/skipped_short")).at(0), 0);  // 65-token samples
  for (double share : values<double>(h5.read_tensor("/memorization/summary/extractable_share"))) {
    EXPECT_GE(share, 0.0);
    EXPECT_LE(share, 1.0);
  }

  // Written once: a second run refuses to overwrite; an explicit --out works from the checkpoint dir itself.
  r = run_keel("eval " + run + " --batches 1 --memorization-samples 1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(out + ": exists"), std::string::npos) << r.output;
  // With --json the results come as one object on stdout (warnings go to stderr), and equal the file's.
  r = run_shell(std::string(KEEL_BINARY) + " eval " + run +
                "/checkpoints/step-00000010 --batches 1 --memorization-samples 1 --json --out " + run +
                "/other.h5 2>/dev/null");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(fs::exists(run + "/other.h5"));
  const auto report = nlohmann::json::parse(r.output);
  EXPECT_EQ(report.at("step"), 10);
  EXPECT_EQ(report.at("out"), fs::weakly_canonical(run + "/other.h5").string());
  const H5Reader other(run + "/other.h5");
  for (const char* source : {"prose", "code"}) {
    const auto& row = report.at("sources").at(source);
    EXPECT_EQ(row.at("nll").get<double>(),
              values<double>(other.read_tensor(std::string("/validation/") + source + "/nll")).at(0))
        << source;
    EXPECT_EQ(row.at("tokens"), 8 * 64) << source;
    EXPECT_EQ(row.at("seen_in_training"), 0) << source;
    EXPECT_TRUE(report.at("memorization").at("sources").contains(source)) << source;
  }
  EXPECT_EQ(report.at("memorization").at("prompt_tokens"), 32);
  // Never inside the checkpoint (its manifest lists every file it holds).
  r = run_keel("eval " + run + " --batches 1 --out " + run + "/checkpoints/step-00000010/eval.h5");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("is inside the checkpoint"), std::string::npos) << r.output;
  fs::remove_all(run);
}

TEST(EvalRun, RefusesAPathThatIsNotACheckpointNamingIt) {
  const std::string dir = fresh_dir("eval-not-ckpt");
  fs::create_directories(dir);
  auto r = run_keel("eval " + dir);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("keel eval: error: " + dir), std::string::npos) << r.output;
  r = run_keel("eval " + dir + "/missing");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(dir + "/missing: no such checkpoint or run directory"), std::string::npos) << r.output;
  r = run_keel("eval " + dir + " --batches 0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--batches must be >= 1"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

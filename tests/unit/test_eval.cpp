// Why: `keel eval`'s numbers must mean what docs/eval.md says: the memorization score is Analysis360's
// (checked against hand-made predictors whose greedy output we control), perplexity is exp of the same mean
// token NLL that Llama::loss reports, a checkpoint's weights load by name or are refused naming the tensor,
// the eval and memorization samples are picked deterministically, and the HDF5 report reads back.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/h5_file.h"
#include "core/data/loader.h"
#include "core/eval/eval.h"
#include "tests/unit/test_support.h"

using namespace keel::eval;
using keel::data::SampleRef;

namespace {

constexpr int32_t kVocab = 1000;

// Sequence i: first token i (so a predictor can tell which sequence a prefix belongs to), then a pattern.
TrainingSequence make_sequence(int32_t index, int64_t length, int64_t chunk) {
  TrainingSequence s;
  s.source = index % 2;
  s.sample_id = 100 + index;
  s.chunk = chunk;
  for (int64_t t = 0; t < length; ++t)
    s.tokens.push_back(t == 0 ? index : static_cast<int32_t>((index * 7 + t * 13) % kVocab));
  return s;
}

// Predicts the true next token of sequence prefix[0] for the first `right[index]` generated tokens, then a wrong one.
NextTokenFn controlled_predictor(const std::vector<TrainingSequence>& truth, std::map<int32_t, int64_t> right) {
  return [truth, right](const std::vector<std::vector<int32_t>>& prefixes) {
    std::vector<int32_t> out;
    for (const auto& p : prefixes) {
      const TrainingSequence& s = truth.at(static_cast<size_t>(p.front()));
      const auto generated = static_cast<int64_t>(p.size()) - kPromptTokens;
      const int32_t correct = s.tokens.at(p.size());
      out.push_back(generated < right.at(p.front()) ? correct : (correct + 1) % kVocab);
    }
    return out;
  };
}

keel::ModelConfig small_model() { return keel::testing::small_model_config(16); }

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("keel-eval-" + name + "-" + std::to_string(::getpid()))).string();
}

}  // namespace

TEST(Memorization, PerfectCopyScoresOneAndHalfRightScoresHalf) {
  const std::vector<TrainingSequence> seqs = {make_sequence(0, 64, 3), make_sequence(1, 65, 3),
                                              make_sequence(2, 80, 5)};
  // Sequence 0 copied perfectly, 1 right for 16 of 32 tokens, 2 never right.
  const auto scores = score_memorization(seqs, controlled_predictor(seqs, {{0, 32}, {1, 16}, {2, 0}}));
  ASSERT_EQ(scores.score.size(), 3u);
  EXPECT_DOUBLE_EQ(scores.score[0], 1.0);
  EXPECT_DOUBLE_EQ(scores.score[1], 0.5);
  EXPECT_DOUBLE_EQ(scores.score[2], 0.0);
  EXPECT_EQ(scores.sample_id, (std::vector<int64_t>{100, 101, 102}));
  EXPECT_EQ(scores.chunk, (std::vector<int64_t>{3, 3, 5}));
  EXPECT_EQ(scores.source, (std::vector<int32_t>{0, 1, 0}));
  EXPECT_EQ(scores.skipped_short, 0);
}

TEST(Memorization, GreedyContinuesItsOwnOutputAndScoresOnlyTheLTokens) {
  // Right only on the last generated token (index 31): 1/32, whatever the earlier mistakes were.
  const std::vector<TrainingSequence> seqs = {make_sequence(0, 64, 0)};
  const NextTokenFn last_only = [&](const std::vector<std::vector<int32_t>>& prefixes) {
    const int32_t correct = seqs[0].tokens.at(prefixes[0].size());
    return std::vector<int32_t>{prefixes[0].size() == 63 ? correct : (correct + 1) % kVocab};
  };
  const auto scores = score_memorization(seqs, last_only);
  EXPECT_DOUBLE_EQ(scores.score.at(0), 1.0 / 32.0);
}

TEST(Memorization, ShortSequencesAreSkippedAndCounted) {
  const std::vector<TrainingSequence> seqs = {make_sequence(0, 63, 0), make_sequence(1, 64, 0),
                                              make_sequence(2, 10, 0)};
  const auto scores = score_memorization(seqs, controlled_predictor(seqs, {{0, 32}, {1, 32}, {2, 32}}));
  EXPECT_EQ(scores.skipped_short, 2);
  ASSERT_EQ(scores.sample_id, (std::vector<int64_t>{101}));
  EXPECT_DOUBLE_EQ(scores.score[0], 1.0);
}

TEST(Memorization, BatchingDoesNotChangeScores) {
  std::vector<TrainingSequence> seqs;
  std::map<int32_t, int64_t> right;
  for (int32_t i = 0; i < 7; ++i) {
    seqs.push_back(make_sequence(i, 64 + i, i % 3));
    right[i] = (i * 5) % 33;
  }
  MemorizationOptions one, three;
  one.batch = 1;
  three.batch = 3;
  const auto a = score_memorization(seqs, controlled_predictor(seqs, right), one);
  const auto b = score_memorization(seqs, controlled_predictor(seqs, right), three);
  EXPECT_EQ(a.score, b.score);
  for (int32_t i = 0; i < 7; ++i)
    EXPECT_DOUBLE_EQ(a.score[static_cast<size_t>(i)], static_cast<double>(right[i]) / 32.0);
}

TEST(Memorization, SummaryPerSourceAndChunk) {
  MemorizationScores s;
  s.source = {0, 0, 0, 1, 1};
  s.chunk = {2, 2, 4, 0, 0};
  s.score = {1.0, 0.5, 1.0, 0.25, 0.75};
  s.sample_id = {1, 2, 3, 4, 5};
  const auto summary = summarize_memorization(s, 3);
  ASSERT_EQ(summary.size(), 3u + 3u);  // 3 sources, then (0,2), (0,4), (1,0)
  EXPECT_EQ(summary[0].chunk, -1);
  EXPECT_EQ(summary[0].sequences, 3);
  EXPECT_NEAR(summary[0].mean_score, 2.5 / 3.0, 1e-12);
  EXPECT_NEAR(summary[0].extractable_share, 2.0 / 3.0, 1e-12);
  EXPECT_EQ(summary[1].sequences, 2);
  EXPECT_DOUBLE_EQ(summary[1].mean_score, 0.5);
  EXPECT_DOUBLE_EQ(summary[1].extractable_share, 0.0);
  EXPECT_EQ(summary[2].sequences, 0);  // a source without sequences
  EXPECT_EQ(summary[3].source, 0);
  EXPECT_EQ(summary[3].chunk, 2);
  EXPECT_DOUBLE_EQ(summary[3].mean_score, 0.75);
  EXPECT_DOUBLE_EQ(summary[3].extractable_share, 0.5);
  EXPECT_EQ(summary[4].chunk, 4);
  EXPECT_DOUBLE_EQ(summary[4].extractable_share, 1.0);
  EXPECT_EQ(summary[5].source, 1);
  EXPECT_DOUBLE_EQ(summary[5].mean_score, 0.5);
}

TEST(Memorization, BadInputIsRefused) {
  const std::vector<TrainingSequence> seqs = {make_sequence(0, 64, 0)};
  MemorizationOptions bad;
  bad.prompt_tokens = 0;
  EXPECT_THROW(score_memorization(seqs, controlled_predictor(seqs, {{0, 32}}), bad), std::invalid_argument);
  const NextTokenFn wrong_count = [](const std::vector<std::vector<int32_t>>&) { return std::vector<int32_t>{1, 2}; };
  try {
    score_memorization(seqs, wrong_count);
    FAIL() << "expected a throw";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("returned 2 tokens for 1 prefixes"), std::string::npos) << e.what();
  }
  MemorizationScores s;
  s.source = {5};
  s.chunk = {0};
  s.score = {1.0};
  s.sample_id = {0};
  EXPECT_THROW(summarize_memorization(s, 2), std::invalid_argument);
}

TEST(EvalPerplexity, IsExpOfTheMeanNllThatLlamaLossReports) {
  torch::manual_seed(0);
  keel::model::Llama model(small_model());
  model->init_weights(7);
  const torch::Tensor windows = torch::randint(0, 50, {5, 17}, torch::kInt64);  // [N, T+1]
  const std::vector<double> per_window = window_nll(model, windows, 2);         // batches of 2, 2, 1
  ASSERT_EQ(per_window.size(), 5u);
  double sum = 0.0;
  for (double v : per_window) sum += v;
  const double mean = sum / 5.0;
  const double reference = model->loss(windows, torch::kFloat32).nll.item<double>();
  EXPECT_NEAR(mean, reference, 1e-5);
  EXPECT_GT(std::exp(mean), 1.0);
  EXPECT_LT(std::exp(mean), 50.0 * 2);  // near-uniform at init: close to the vocab size, not far above
  // One window alone gives its own value.
  EXPECT_NEAR(window_nll(model, windows.slice(0, 3, 4), 8).at(0), per_window[3], 1e-6);
}

TEST(EvalLoadModel, CopiesByNameAndRefusesMissingOrMisshapenTensors) {
  keel::Config config;
  config.model = small_model();
  keel::model::Llama trained(config.model);
  trained->init_weights(11);
  keel::checkpoint::TrainingState state;
  for (const auto& item : trained->named_parameters())
    state.model.emplace_back(item.key(), item.value().detach().clone());
  const keel::model::Llama loaded = load_model(config, state, "ckpt/step-00000001");
  const torch::Tensor tokens = torch::randint(0, 50, {2, 8}, torch::kInt64);
  EXPECT_TRUE(torch::equal(loaded->forward(tokens, torch::kFloat32), trained->forward(tokens, torch::kFloat32)));

  auto missing = state;
  const std::string dropped = missing.model.back().first;
  missing.model.pop_back();
  try {
    load_model(config, missing, "ckpt/step-00000001");
    FAIL() << "expected a throw";
  } catch (const keel::checkpoint::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("ckpt/step-00000001: model tensor " + dropped + " is missing"),
              std::string::npos)
        << e.what();
  }
  auto misshapen = state;
  misshapen.model.front().second = torch::zeros({3, 3});
  try {
    load_model(config, misshapen, "ckpt/step-00000001");
    FAIL() << "expected a throw";
  } catch (const keel::checkpoint::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(misshapen.model.front().first + " has shape [3, 3]"), std::string::npos)
        << e.what();
  }
}

TEST(EvalSamples, EvalIdsAreTheTailOfTheEpochZeroOrder) {
  const auto order = keel::data::epoch_permutation(42, "prose", 0, 100);
  const auto ids = eval_sample_ids(42, "prose", 100, 10);
  EXPECT_EQ(ids, std::vector<int64_t>(order.end() - 10, order.end()));
  EXPECT_EQ(eval_sample_ids(42, "prose", 100, 10), ids);      // deterministic
  EXPECT_EQ(eval_sample_ids(42, "prose", 5, 10).size(), 5u);  // a small source gives all it has
  EXPECT_NE(eval_sample_ids(43, "prose", 100, 10), ids);      // the data seed decides
}

TEST(EvalSamples, MemorizationPicksDistinctSamplesEvenlyPerChunk) {
  std::vector<SampleRef> consumed;
  for (int64_t i = 0; i < 10; ++i) consumed.push_back({0, i, 0, i / 5});  // source 0: chunks 0 and 1
  consumed.push_back({0, 3, 1, 1});                                       // seen again in epoch 1: not picked twice
  for (int64_t i = 0; i < 3; ++i) consumed.push_back({1, 50 + i, 0, 7});  // source 1, chunk 7
  const auto picked = pick_memorization_samples(consumed, 2);
  std::vector<std::tuple<int32_t, int64_t, int64_t>> got;
  for (const auto& s : picked) got.emplace_back(s.source, s.chunk, s.sample_id);
  EXPECT_EQ(got, (std::vector<std::tuple<int32_t, int64_t, int64_t>>{
                     {0, 0, 0}, {0, 0, 2}, {0, 1, 5}, {0, 1, 7}, {1, 7, 50}, {1, 7, 51}}));
  EXPECT_TRUE(pick_memorization_samples(consumed, 0).empty());
}

TEST(EvalReport, WritesTheDocumentedLayoutAndRefusesToOverwrite) {
  EvalReport r;
  r.checkpoint_dir = "run/checkpoints/step-00000004";
  r.step = 4;
  r.source_names = {"prose", "code"};
  for (const auto& name : r.source_names) {
    SourcePerplexity p;
    p.source = name;
    p.sample_ids = {3, 9};
    p.sample_nll = {2.0, 4.0};
    p.tokens = 32;
    p.mean_nll = 3.0;
    p.perplexity = std::exp(3.0);
    r.perplexity.push_back(p);
  }
  r.memorization.source = {0, 1};
  r.memorization.sample_id = {5, 6};
  r.memorization.chunk = {1, 2};
  r.memorization.score = {1.0, 0.5};
  r.memorization.skipped_short = 3;
  r.memorization_summary = summarize_memorization(r.memorization, 2);
  const std::string path = temp_path("report") + "/eval/step-00000004.h5";
  std::filesystem::remove_all(std::filesystem::path(path).parent_path().parent_path());
  write_report(path, r);

  const keel::checkpoint::H5Reader h5(path);
  EXPECT_EQ(h5.string_attribute("/", "checkpoint_dir"), r.checkpoint_dir);
  EXPECT_EQ(h5.int_attribute("/", "step"), 4);
  EXPECT_EQ(h5.int_attribute("/", "k"), 32);
  EXPECT_EQ(h5.int_attribute("/", "l"), 32);
  EXPECT_EQ(nlohmann::json::parse(h5.read_text("/source_names")), nlohmann::json({"prose", "code"}));
  const auto ppl = h5.read_tensor("/validation/code/perplexity");
  ASSERT_EQ(ppl.bytes.size(), sizeof(double));
  double value = 0.0;
  std::memcpy(&value, ppl.bytes.data(), sizeof(double));
  EXPECT_DOUBLE_EQ(value, std::exp(3.0));
  EXPECT_EQ(h5.read_tensor("/memorization/score").shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(h5.read_tensor("/memorization/summary/mean_score").shape, (std::vector<int64_t>{4}));
  for (const char* name : {"/validation/prose/nll", "/validation/prose/tokens", "/validation/prose/sample_nll",
                           "/memorization/source", "/memorization/sample_id", "/memorization/chunk",
                           "/memorization/skipped_short", "/memorization/summary/extractable_share"}) {
    EXPECT_TRUE(h5.exists(name)) << name;
  }
  EXPECT_NE(format_report(r).find("prose"), std::string::npos);
  try {
    write_report(path, r);
    FAIL() << "expected a throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path + ": exists"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(std::filesystem::path(path).parent_path().parent_path());
}

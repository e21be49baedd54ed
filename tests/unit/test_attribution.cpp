// Why: `keel forensics` ranks samples, searches a removal set and writes a skip list from a batch's per-sample
// losses and gradient Gram matrix, and `keel resume --skip-list` reads that list back; each piece is small, exact
// arithmetic that a wrong index would silently spoil, so each is checked here against values worked out by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/forensics/attribution.h"
#include "core/train/skip_rules.h"

namespace keel::forensics {
namespace {

// Samples with gradients g_i given as rows; gram = G G^T.
SampleGradients make(const std::vector<double>& loss, const std::vector<std::vector<double>>& g) {
  SampleGradients s;
  s.samples = static_cast<int64_t>(loss.size());
  s.parameters = static_cast<int64_t>(g.at(0).size());
  s.loss = loss;
  for (const auto& a : g) {
    for (const auto& b : g) {
      double dot = 0.0;
      for (size_t k = 0; k < a.size(); ++k) dot += a[k] * b[k];
      s.gram.push_back(dot);
    }
  }
  return s;
}

TEST(Attribution, SubsetValuesFollowFromTheGramMatrix) {
  const SampleGradients g = make({1.0, 2.0, 9.0}, {{1, 0}, {0, 1}, {3, 4}});
  EXPECT_DOUBLE_EQ(g.subset_loss({false, false, false}), 4.0);
  EXPECT_NEAR(g.batch_grad_norm(), std::sqrt(4.0 * 4.0 + 5.0 * 5.0) / 3.0, 1e-12);
  EXPECT_NEAR(g.subset_grad_norm({false, false, true}), std::sqrt(2.0) / 2.0, 1e-12);
  EXPECT_NEAR(g.grad_norm(2), 5.0, 1e-12);
  double shares = 0.0;
  for (int64_t i = 0; i < 3; ++i) shares += g.grad_share(i);
  EXPECT_NEAR(shares, g.batch_grad_norm(), 1e-12);  // the shares add up to the norm
}

TEST(Attribution, SearchFindsTheSmallestSetThatBringsTheStepWithin) {
  // Two outliers (slots 1 and 3) with large losses and gradients; the others are alike.
  const SampleGradients g = make({1.0, 8.0, 1.1, 9.0, 0.9}, {{1, 0}, {30, 30}, {1, 0.1}, {-20, 40}, {0.9, 0}});
  const SearchResult r = search_removal(g, 1.5, 2.0);
  EXPECT_TRUE(r.reached);
  EXPECT_FALSE(r.within_at_start);
  EXPECT_EQ(r.removed, (std::vector<int64_t>{1, 3}));
  EXPECT_NE(r.method.find("exhaustive"), std::string::npos) << r.method;
  ASSERT_GE(r.trace.size(), 2u);
  EXPECT_NEAR(r.trace.front().loss, 4.0, 1e-12);
  EXPECT_NEAR(r.trace.back().loss, 1.0, 1e-12);
}

TEST(Attribution, SearchSaysWhenNothingIsNeededOrNothingSuffices) {
  const SampleGradients g = make({1.0, 1.0}, {{1, 0}, {0, 1}});
  EXPECT_TRUE(search_removal(g, 5.0, 5.0).within_at_start);
  EXPECT_TRUE(search_removal(g, 5.0, 5.0).removed.empty());
  const SearchResult none = search_removal(g, 0.5, 5.0);  // every sample is above it: keeping one never suffices
  EXPECT_FALSE(none.reached);
  EXPECT_TRUE(none.removed.empty());
}

TEST(Attribution, SkipSpecsUseWholeChunksAndSampleRanges) {
  const std::vector<BatchSample> batch = {{0, 0, 10, 0, 3}, {1, 0, 11, 0, 3}, {2, 1, 50, 0, 7},
                                          {3, 1, 51, 0, 7}, {4, 1, 53, 0, 8}, {5, 0, 12, 0, 4}};
  // Chunk 3 of src a wholly removed; of chunk 7 of b only one of two; 53 alone.
  EXPECT_EQ(skip_specs(batch, {0, 1, 2, 4}, {"a", "b"}),
            (std::vector<std::string>{"a:chunk:3", "b:samples:50", "b:samples:53"}));
  EXPECT_EQ(skip_specs(batch, {2, 3, 4}, {"a", "b"}), (std::vector<std::string>{"b:chunk:7", "b:samples:53"}));
  EXPECT_EQ(skip_specs(batch, {5}, {"a", "b"}), (std::vector<std::string>{"a:samples:12"}));
}

TEST(Attribution, ThresholdFollowsTheDetectorsRuleAndLeavesSpikesOut) {
  LoggedRun run;
  for (int64_t s = 0; s < 12; ++s) run.steps[s] = {s, s % 2 ? 3.0 : 1.0, 1.0, {}, {}, {}};
  run.steps[12] = {12, 100.0, 1.0, {}, {}, {}};  // a spike: kept out of the window
  run.steps[13] = {13, 1.0, 1.0, {}, {}, {}};
  ThresholdOptions o;
  const Threshold t = spike_threshold(run, 14, o);
  ASSERT_TRUE(t.defined);
  EXPECT_EQ(t.history, 13);
  const double mean = (6 * 3.0 + 7 * 1.0) / 13.0;
  double var = 0.0;
  for (int i = 0; i < 13; ++i) var += std::pow((i < 6 ? 3.0 : 1.0) - mean, 2);
  EXPECT_NEAR(t.max_loss, mean + 6.0 * std::sqrt(var / 13.0), 1e-12);
  EXPECT_NEAR(t.max_grad_norm, 1.0 + 6.0 * (1e-4 + 1e-12), 1e-12);  // a flat window: the floored std
  EXPECT_FALSE(spike_threshold(run, 5, o).defined);                 // 5 values < min_history 10
  o.max_loss = 2.5;
  const Threshold explicit_max = spike_threshold(run, 5, o);
  EXPECT_TRUE(explicit_max.defined);
  EXPECT_DOUBLE_EQ(explicit_max.max_loss, 2.5);
  EXPECT_TRUE(std::isinf(explicit_max.max_grad_norm));
}

TEST(SkipListFile, ReadsRulesAndRefusesABadLineNamingFileAndLine) {
  const std::string path = (std::filesystem::temp_directory_path() / "keel-unit-skip-list.skip").string();
  std::ofstream(path) << "# from keel forensics\n\nprose:chunks:3 ; code:samples:10-12\ncode:sample:7  # why\n";
  EXPECT_EQ(train::read_skip_list(path, {"prose", "code"}),
            (std::vector<std::string>{"prose:chunk:3", "code:samples:10-12", "code:samples:7"}));
  std::ofstream(path) << "prose:chunk:1\nprose:chunk:9-2\n";
  try {
    train::read_skip_list(path, {"prose"});
    FAIL() << "a reversed range was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path + ":2: ", 0), 0u) << e.what();
  }
  std::ofstream(path) << "# nothing\n";
  EXPECT_THROW(train::read_skip_list(path, {"prose"}), std::runtime_error);
  EXPECT_THROW(train::read_skip_list(path + ".missing", {"prose"}), std::runtime_error);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace keel::forensics

// Why: the layout arithmetic every parallel component relies on, and the communicator's collectives over real
// Gloo groups (ranks as threads, tests/unit/parallel_ranks.h).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/config/config.h"
#include "core/parallel/layout.h"
#include "tests/unit/parallel_ranks.h"

namespace keel::parallel {
namespace {

TEST(ParallelLayout, RanksAndGroupsFollowTpDpPpOrder) {
  const Layout layout(2, 2, 2);
  EXPECT_EQ(layout.world_size(), 8);
  const Coordinates c = layout.coordinates_of(5);  // 5 = (pp 1 * dp 2 + dp 0) * tp 2 + tp 1
  EXPECT_EQ(c.tp, 1);
  EXPECT_EQ(c.dp, 0);
  EXPECT_EQ(c.pp, 1);
  for (int64_t r = 0; r < 8; ++r) EXPECT_EQ(layout.rank_of(layout.coordinates_of(r)), r);
  EXPECT_EQ(layout.tp_group(5), (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(layout.dp_group(5), (std::vector<int64_t>{5, 7}));
  EXPECT_EQ(layout.pp_group(5), (std::vector<int64_t>{1, 5}));
  EXPECT_EQ(layout.stage_layers(4, 1).first, 2);
  EXPECT_EQ(layout.describe_rank(5), "rank 5 (dp 0, tp 1, pp 1)");
}

TEST(ParallelLayout, WorldSizeMismatchNamesTheKeys) {
  try {
    Layout(2, 2, 1).require_world_size(8, "keel launch");
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("parallel.dp x parallel.tp x parallel.pp = 2 x 2 x 1 = 4"), std::string::npos) << what;
    EXPECT_NE(what.find("the job has 8 ranks (keel launch)"), std::string::npos) << what;
  }
}

TEST(ParallelLayout, ConfigRejectsLayoutsThatDoNotDivide) {
  Config c;
  c.train.micro_batch = 2;
  c.train.grad_accum = 3;
  c.parallel.dp = 2;
  EXPECT_THROW(validate(c), ConfigError);  // grad_accum 3 is not divisible by dp 2
  c.train.grad_accum = 4;
  validate(c);
  EXPECT_EQ(c.microbatches_per_rank(), 2);
  EXPECT_EQ(c.rank_micro_batch(), 2);
  c.parallel.tp = 3;  // heads 4
  EXPECT_THROW(validate(c), ConfigError);
}

TEST(Communicator, CollectivesAgreeAcrossFourRanks) {
  std::vector<double> sums(4), maxes(4);
  std::vector<std::string> texts(4);
  testing::run_ranks(2, 2, 1, [&](ProcessGroups& g) {
    at::Tensor t = torch::full({3}, static_cast<float>(g.rank + 1));
    g.world->all_reduce(t);
    sums[g.rank] = t[0].item<double>();
    at::Tensor m = torch::full({1}, static_cast<float>(g.rank)).to(torch::kBFloat16);
    g.world->all_reduce(m, ReduceOp::kMax);
    maxes[g.rank] = m.item<double>();
    EXPECT_EQ(m.scalar_type(), torch::kBFloat16);
    texts[g.rank] = g.world->broadcast_string(g.rank == 0 ? "decision from rank 0" : "", 0);
    const auto names = g.tp->all_gather_strings("tp" + std::to_string(g.coords.tp));
    EXPECT_EQ(names, (std::vector<std::string>{"tp0", "tp1"}));
    if (g.tp->rank() == 0) {
      g.tp->send(torch::arange(4, torch::kFloat), 1, 7).wait();
    } else {
      at::Tensor got = torch::zeros({4});
      g.tp->recv(got, 0, 7);
      EXPECT_TRUE(torch::equal(got, torch::arange(4, torch::kFloat)));
    }
  });
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(sums[r], 10.0);
    EXPECT_EQ(maxes[r], 3.0);
    EXPECT_EQ(texts[r], "decision from rank 0");
  }
}

}  // namespace
}  // namespace keel::parallel

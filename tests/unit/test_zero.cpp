// Why: ZeRO-1 is worth having only if it changes memory and nothing else. The partition must give every
// parameter exactly one owner, balanced and identical on every rank; broadcast_from_owners must leave every rank
// with the owners' values (in-place and packed paths, fp32 and bf16); and a ZeRO-1 AdamW-style step on DP 2 must
// produce exactly the parameters of the plain replicated step.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/optim/zero.h"
#include "tests/unit/parallel_ranks.h"

namespace keel::optim {
namespace {

torch::Tensor fixed_tensor(const std::vector<int64_t>& shape, double seed, double scale) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return (torch::sin(torch::arange(numel, torch::kDouble) * 0.731 + seed) * scale).to(torch::kFloat).reshape(shape);
}

TEST(Zero, PartitionCoversEveryParameterOnceAndBalances) {
  const std::vector<int64_t> numels{4096, 64, 4096, 64, 16384, 64, 4096, 1, 8192, 300, 300, 12};
  for (int64_t dp : {1, 2, 3, 4, 8}) {
    const ZeroPartition partition = partition_for_zero(numels, dp);
    ASSERT_EQ(partition.owner.size(), numels.size());
    std::vector<int64_t> seen(numels.size(), 0);
    std::vector<int64_t> load(static_cast<size_t>(dp), 0);
    for (int64_t r = 0; r < dp; ++r) {
      for (int64_t index : partition.owned_by(r)) {
        ++seen[static_cast<size_t>(index)];
        load[static_cast<size_t>(r)] += numels[static_cast<size_t>(index)];
        EXPECT_TRUE(partition.owns(r, index));
      }
    }
    for (size_t k = 0; k < numels.size(); ++k) EXPECT_EQ(seen[k], 1) << "param " << k << ", dp " << dp;
    // Greedy largest-first: the most and least loaded ranks differ by at most one parameter's size.
    const int64_t largest = *std::max_element(numels.begin(), numels.end());
    EXPECT_LE(*std::max_element(load.begin(), load.end()) - *std::min_element(load.begin(), load.end()), largest);
    EXPECT_EQ(partition_for_zero(numels, dp).owner, partition.owner);  // deterministic
  }
  // The rule pinned down, worked by hand for dp 2 (largest first, ties by index; least loaded, ties to rank 0):
  // 16384(4)->0, 8192(8)->1, 4096(0)->1, 4096(2)->1 (loads now equal), 4096(6)->0, then rank 1 is lighter for the rest.
  EXPECT_EQ(partition_for_zero(numels, 2).owner, (std::vector<int64_t>{1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1}));
  EXPECT_EQ(partition_for_zero({}, 3).owner.size(), 0u);
  EXPECT_EQ(partition_for_zero({5, 5, 5}, 1).owner, (std::vector<int64_t>{0, 0, 0}));
}

TEST(Zero, BroadcastFromOwnersGivesEveryRankTheOwnersValues) {
  // Two large fp32 matrices (in place, one of them transposed: not contiguous), small fp32 and bf16 tensors
  // (packed, one of them transposed).
  const std::vector<std::vector<int64_t>> shapes{{300, 300}, {7}, {5, 3}, {300, 300}, {9}, {2, 3}};
  auto make_param = [&](size_t k, int64_t rank) {
    torch::Tensor p = fixed_tensor(shapes[k], 10.0 * static_cast<double>(rank) + static_cast<double>(k), 1.0);
    if (k == 3 || k == 5) p = p.t();
    if (k == 4) p = p.to(torch::kBFloat16);
    return p;
  };
  std::vector<int64_t> numels;
  for (size_t k = 0; k < shapes.size(); ++k) numels.push_back(make_param(k, 0).numel());
  testing::run_ranks(3, 1, 1, [&](parallel::ProcessGroups& g) {
    const int64_t rank = g.dp->rank();
    const ZeroPartition partition = partition_for_zero(numels, g.dp->size());
    std::vector<torch::Tensor> params;
    for (size_t k = 0; k < shapes.size(); ++k) params.push_back(make_param(k, rank).requires_grad_(true));
    EXPECT_FALSE(params[3].is_contiguous());
    broadcast_from_owners(params, partition, *g.dp);
    for (size_t k = 0; k < shapes.size(); ++k) {
      EXPECT_TRUE(torch::equal(params[k].detach(), make_param(k, partition.owner[k])))
          << "param " << k << " on rank " << rank;
      EXPECT_TRUE(params[k].requires_grad());
    }
  });
}

// The AdamW update of one tensor (decoupled weight decay), as an optimizer plugin would do it.
struct AdamWState {
  torch::Tensor exp_avg, exp_avg_sq;  // like the parameter
};
void adamw_update(torch::Tensor& param, const torch::Tensor& grad, AdamWState& state, int64_t step) {
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  torch::NoGradGuard no_grad;
  if (!state.exp_avg.defined()) {
    state.exp_avg = torch::zeros_like(param);
    state.exp_avg_sq = torch::zeros_like(param);
  }
  param.mul_(1.0 - lr * weight_decay);
  state.exp_avg.mul_(beta1).add_(grad, 1.0 - beta1);
  state.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  torch::Tensor denom = (state.exp_avg_sq / bias2).sqrt().add_(eps);
  param.addcdiv_(state.exp_avg, denom, -lr / bias1);
}

TEST(Zero, ZeroOneAdamWStepEqualsTheReplicatedStep) {
  const std::vector<std::vector<int64_t>> shapes{{16, 8}, {8}, {8, 16}, {16}, {4, 4}, {3}};
  std::vector<int64_t> numels;
  for (const auto& s : shapes) numels.push_back(s[0] * (s.size() > 1 ? s[1] : 1));
  auto initial = [&](size_t k) { return fixed_tensor(shapes[k], 3.0 + k, 0.5); };
  auto gradient = [&](size_t k, int64_t step) { return fixed_tensor(shapes[k], 40.0 + 7.0 * step + k, 0.2); };
  const int64_t steps = 3;

  // Replicated: every parameter stepped with full optimizer state.
  std::vector<torch::Tensor> replicated;
  std::vector<AdamWState> replicated_state(shapes.size());
  for (size_t k = 0; k < shapes.size(); ++k) replicated.push_back(initial(k).requires_grad_(true));
  for (int64_t step = 1; step <= steps; ++step)
    for (size_t k = 0; k < shapes.size(); ++k)
      adamw_update(replicated[k], gradient(k, step), replicated_state[k], step);

  testing::run_ranks(2, 1, 1, [&](parallel::ProcessGroups& g) {
    const ZeroPartition partition = partition_for_zero(numels, g.dp->size());
    const std::vector<int64_t> mine = partition.owned_by(g.dp->rank());
    EXPECT_FALSE(mine.empty());
    std::vector<torch::Tensor> params;
    std::vector<AdamWState> state(shapes.size());  // filled only for owned parameters
    for (size_t k = 0; k < shapes.size(); ++k) params.push_back(initial(k).requires_grad_(true));
    for (int64_t step = 1; step <= steps; ++step) {
      // (The gradients are already all-reduced: identical on both ranks.) Only owners step.
      for (int64_t index : mine) {
        const size_t k = static_cast<size_t>(index);
        adamw_update(params[k], gradient(k, step), state[k], step);
      }
      broadcast_from_owners(params, partition, *g.dp, /*coalesce_below_numel=*/64);  // both paths
    }
    for (size_t k = 0; k < shapes.size(); ++k) {
      EXPECT_TRUE(torch::equal(params[k].detach(), replicated[k].detach())) << "param " << k;
      EXPECT_EQ(state[k].exp_avg.defined(), partition.owns(g.dp->rank(), static_cast<int64_t>(k)));
    }
  });
}

}  // namespace
}  // namespace keel::optim

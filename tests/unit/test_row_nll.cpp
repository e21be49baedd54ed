// Why: per-sample losses (metrics /data/sample_loss) are made from the loss head's per-token losses, so every
// path of the head must return them, and they must be exactly what its mean token loss averages: the plain
// autograd path, the fused chunked path (the CPU reference of the CUDA kernel), with and without z-loss, and with
// ignored targets (0, outside the mean).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/tp_layers.h"
#include "kernels/cross_entropy.h"

namespace {

TEST(RowNll, ThePlainHeadReturnsEachTokensLossAndTheirMeanIsTheLoss) {
  torch::manual_seed(3);
  const torch::Tensor logits = torch::randn({6, 11}, torch::requires_grad());  // [N, V]
  const torch::Tensor targets = torch::randint(0, 11, {6}, torch::kLong);      // [N]
  for (const double z : {0.0, 1e-3}) {
    const auto parts = keel::model::vocab_parallel_cross_entropy(logits, targets, z, {});
    ASSERT_TRUE(parts.row_nll.defined());
    ASSERT_EQ(parts.row_nll.sizes(), torch::IntArrayRef({6}));
    EXPECT_FALSE(parts.row_nll.requires_grad());
    const torch::Tensor want =
        torch::nll_loss(torch::log_softmax(logits.detach(), -1), targets, {}, at::Reduction::None);  // [N]
    EXPECT_TRUE(torch::allclose(parts.row_nll, want, 1e-6, 1e-6));
    EXPECT_EQ(parts.row_nll.mean().item<float>(), parts.nll.item<float>()) << "the reported loss is their mean";
  }
}

TEST(RowNll, TheFusedHeadReturnsEachRowsLossZeroForAnIgnoredRow) {
  torch::manual_seed(4);
  const torch::Tensor hidden = torch::randn({9, 8}, torch::requires_grad());   // [N, C]
  const torch::Tensor weight = torch::randn({13, 8}, torch::requires_grad());  // [V, C]
  torch::Tensor targets = torch::randint(0, 13, {9}, torch::kLong);            // [N]
  targets[4] = keel::kernels::kIgnoreIndex;
  const auto parts = keel::kernels::fused_linear_cross_entropy_reference(hidden, weight, targets, 1e-3, 4);
  ASSERT_EQ(parts.row_nll.sizes(), torch::IntArrayRef({9}));
  EXPECT_FALSE(parts.row_nll.requires_grad());
  EXPECT_EQ(parts.row_nll[4].item<float>(), 0.0f);
  const torch::Tensor logits = torch::matmul(hidden.detach(), weight.detach().t());  // [N, V]
  const torch::Tensor want =
      torch::nll_loss(torch::log_softmax(logits, -1), targets, {}, at::Reduction::None, keel::kernels::kIgnoreIndex);
  EXPECT_TRUE(torch::allclose(parts.row_nll, want, 1e-5, 1e-5));
  EXPECT_NEAR((parts.row_nll.sum() / 8).item<float>(), parts.nll.item<float>(), 1e-6);
  parts.loss.backward();  // the extra output leaves the gradient path as it was
  EXPECT_TRUE(hidden.grad().defined());
}

}  // namespace

// Why: padding and masked prompt tokens carry target ignore_index (-100, PyTorch's default). The fused
// cross-entropy must give such a row neither loss nor gradient and average over the other rows only, counting
// them on the device. Checked against the same op on only the kept rows, against LibTorch's own
// cross_entropy(ignore_index), for every row ignored, for an ignore_index inside [0, V), and, on a GPU, the
// kernel against the reference.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "kernels/cross_entropy.h"
#include "kernels/dispatch.h"
#include "tests/unit/test_support.h"

namespace keel::kernels {
namespace {

using keel::testing::error_of;
using keel::testing::relative_error;

struct Result {
  torch::Tensor loss, nll, z_loss, grad_hidden, grad_weight;
};

// The op on leaves copied from `hidden` and `weight`; backward of 1.5 * loss.
Result run_op(bool reference, const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& targets,
              double coef, int64_t chunk_rows, int64_t ignore_index = kIgnoreIndex) {
  torch::Tensor h = hidden.detach().clone().set_requires_grad(true);
  torch::Tensor w = weight.detach().clone().set_requires_grad(true);
  const FusedCrossEntropy parts =
      reference ? fused_linear_cross_entropy_reference(h, w, targets, coef, chunk_rows, ignore_index)
                : fused_linear_cross_entropy(h, w, targets, coef, chunk_rows, ignore_index);
  (1.5 * parts.loss).backward();
  return {parts.loss.detach(), parts.nll.detach(), parts.z_loss.detach(), h.grad(), w.grad()};
}

struct Inputs {
  torch::Tensor hidden, weight, targets, kept;  // kept: [N] bool, the rows not ignored
};

// N rows, rows 1, 4 and 7 (those < N) ignored.
Inputs make_inputs(int64_t N, int64_t C, int64_t V, torch::ScalarType dtype, torch::Device device) {
  torch::manual_seed(21);
  Inputs in;
  in.hidden = torch::randn({N, C}).to(device, dtype);
  in.weight = (torch::randn({V, C}) * 0.5).to(device);
  in.targets = torch::randint(0, V, {N}, torch::kLong);
  for (int64_t row : {1, 4, 7}) {
    if (row < N) in.targets[row] = kIgnoreIndex;
  }
  in.targets = in.targets.to(device);
  in.kept = in.targets.ne(kIgnoreIndex);
  return in;
}

TEST(KernelCrossEntropyIgnore, IgnoredRowsAddNoLossNoGradientAndTheMeanIsOverKeptRows) {
  const Inputs in = make_inputs(10, 8, 19, torch::kFloat, torch::kCPU);
  const torch::Tensor kept_index = in.kept.nonzero().squeeze(-1);  // [7]
  for (double coef : {0.0, 0.05}) {
    for (int64_t chunk_rows : {1, 3, 64}) {
      const std::string label = "coef " + std::to_string(coef) + " chunk_rows " + std::to_string(chunk_rows);
      const Result all = run_op(true, in.hidden, in.weight, in.targets, coef, chunk_rows);
      const Result kept = run_op(true, in.hidden.index_select(0, kept_index), in.weight,
                                 in.targets.index_select(0, kept_index), coef, chunk_rows);
      EXPECT_NEAR(all.loss.item<double>(), kept.loss.item<double>(), 1e-6) << label;
      EXPECT_NEAR(all.nll.item<double>(), kept.nll.item<double>(), 1e-6) << label;
      EXPECT_NEAR(all.z_loss.item<double>(), kept.z_loss.item<double>(), 1e-7) << label;
      EXPECT_LE(relative_error(all.grad_weight, kept.grad_weight), 1e-5) << label;
      EXPECT_LE(relative_error(all.grad_hidden.index_select(0, kept_index), kept.grad_hidden), 1e-5) << label;
      const torch::Tensor ignored_rows = all.grad_hidden.index_select(0, in.kept.logical_not().nonzero().squeeze(-1));
      EXPECT_EQ(ignored_rows.abs().max().item<double>(), 0.0) << label;  // exactly nothing
    }
  }
}

TEST(KernelCrossEntropyIgnore, NllIsLibTorchsCrossEntropyWithIgnoreIndex) {
  const Inputs in = make_inputs(9, 8, 13, torch::kFloat, torch::kCPU);
  torch::Tensor hidden = in.hidden.clone().set_requires_grad(true);
  const torch::Tensor logits = hidden.matmul(in.weight.t());  // [N, V]
  const torch::Tensor expected = torch::nn::functional::cross_entropy(
      logits, in.targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex));
  (1.5 * expected).backward();
  const Result fused = run_op(false, in.hidden, in.weight, in.targets, 0.0, 4);
  EXPECT_NEAR(fused.loss.item<double>(), expected.item<double>(), 1e-5);
  EXPECT_LE(relative_error(fused.grad_hidden, hidden.grad()), 1e-5);
}

TEST(KernelCrossEntropyIgnore, EveryRowIgnoredGivesZeroLossAndZeroGradients) {
  Inputs in = make_inputs(5, 8, 11, torch::kFloat, torch::kCPU);
  in.targets.fill_(kIgnoreIndex);
  const Result r = run_op(false, in.hidden, in.weight, in.targets, 0.1, 2);
  EXPECT_EQ(r.loss.item<double>(), 0.0);
  EXPECT_EQ(r.z_loss.item<double>(), 0.0);
  EXPECT_EQ(r.grad_hidden.abs().max().item<double>(), 0.0);
  EXPECT_EQ(r.grad_weight.abs().max().item<double>(), 0.0);
}

TEST(KernelCrossEntropyIgnore, AnIgnoreIndexInsideTheVocabularyIgnoresThatClass) {
  Inputs in = make_inputs(8, 8, 11, torch::kFloat, torch::kCPU);
  in.targets = torch::tensor({0, 3, 0, 5, 10, 0, 2, 7}, torch::kLong);
  const torch::Tensor kept_index = in.targets.ne(0).nonzero().squeeze(-1);
  const Result as_zero = run_op(true, in.hidden, in.weight, in.targets, 0.02, 3, /*ignore_index=*/0);
  const Result kept = run_op(true, in.hidden.index_select(0, kept_index), in.weight,
                             in.targets.index_select(0, kept_index), 0.02, 3, /*ignore_index=*/0);
  EXPECT_NEAR(as_zero.loss.item<double>(), kept.loss.item<double>(), 1e-6);
  EXPECT_LE(relative_error(as_zero.grad_weight, kept.grad_weight), 1e-5);
}

TEST(KernelCrossEntropyIgnore, OtherOutOfRangeTargetsAreStillRefusedOnCpu) {
  Inputs in = make_inputs(4, 8, 11, torch::kFloat, torch::kCPU);
  in.targets[2] = -1;
  const std::string message = error_of([&] { fused_linear_cross_entropy(in.hidden, in.weight, in.targets, 0.0, 2); });
  EXPECT_NE(message.find("targets must lie in [0, 11) or equal ignore_index -100, got values in [-1,"),
            std::string::npos)
      << message;
}

TEST(KernelCrossEntropyIgnore, FusedKernelIgnoresTheSameRowsAsTheReference) {
  if (!torch::cuda::is_available() || !cuda_kernels_built()) {
    GTEST_SKIP() << "needs a CUDA device and a build with kernels/cuda (KEEL_CUDA=ON)";
  }
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const Inputs in = make_inputs(37, 64, 1001, dtype, torch::kCUDA);
    const Result fused = run_op(false, in.hidden, in.weight, in.targets, 1e-3, 16);
    const Result reference = run_op(true, in.hidden, in.weight, in.targets, 1e-3, 16);
    const double tolerance = dtype == torch::kFloat ? 1e-5 : 1e-2;
    EXPECT_LE(relative_error(fused.loss, reference.loss), tolerance) << dtype;
    EXPECT_LE(relative_error(fused.grad_weight, reference.grad_weight), tolerance) << dtype;
    EXPECT_LE(relative_error(fused.grad_hidden, reference.grad_hidden), tolerance) << dtype;
    const torch::Tensor ignored = in.kept.logical_not().nonzero().squeeze(-1);
    EXPECT_EQ(fused.grad_hidden.index_select(0, ignored).abs().max().item<double>(), 0.0) << dtype;
  }
}

}  // namespace
}  // namespace keel::kernels

// Why: the fused linear + cross-entropy replaces logits -> vocab_parallel_cross_entropy -> autograd in the head,
// so its losses and both gradients must be those of that path. The chunked reference is checked against
// model::vocab_parallel_cross_entropy (one rank) on logits = hidden @ weight^T, for chunk sizes that do and do
// not divide N, with and without z-loss; the CUDA kernel is checked against the reference where a GPU exists.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>

#include "core/model/tp_layers.h"
#include "core/parallel/tensor_parallel.h"
#include "kernels/cross_entropy.h"
#include "kernels/dispatch.h"
#include "tests/unit/test_support.h"

namespace keel::kernels {

namespace {

using keel::testing::error_of;

// max |actual - expected| over max |expected|: one number per tensor, robust to entries near zero.
double scaled_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  torch::Tensor a = actual.detach().to(torch::kCPU, torch::kDouble),
                e = expected.detach().to(torch::kCPU, torch::kDouble);
  const double scale = std::max(e.abs().max().item<double>(), 1e-30);
  return (a - e).abs().max().item<double>() / scale;
}

torch::Tensor leaf(const torch::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

struct Problem {
  torch::Tensor hidden;   // [N, C] compute dtype
  torch::Tensor weight;   // [V, C] fp32
  torch::Tensor targets;  // [N] int64
};

Problem make_problem(int64_t N, int64_t C, int64_t V, torch::ScalarType dtype, torch::Device device, uint64_t seed) {
  torch::manual_seed(seed);
  Problem p;
  p.hidden = torch::randn({N, C}).to(device, dtype);
  p.weight = (torch::randn({V, C}) * (2.0 / std::sqrt(static_cast<double>(C)))).to(device);
  p.targets = torch::randint(0, V, {N}, torch::kLong).to(device);
  return p;
}

struct Outcome {
  torch::Tensor loss, nll, z_loss, grad_hidden, grad_weight;
};

// The path the fused op replaces: the head's linear (weight cast to the compute dtype), then the cross-entropy.
// The backward is of `scale * loss`, so that the incoming gradient is not 1.
Outcome unfused(const Problem& p, double coef, double scale) {
  torch::Tensor hidden = leaf(p.hidden), weight = leaf(p.weight);
  torch::Tensor logits = torch::nn::functional::linear(hidden, weight.to(hidden.scalar_type()));  // [N, V]
  model::CrossEntropyParts parts =
      model::vocab_parallel_cross_entropy(logits, p.targets, coef, parallel::TensorParallel{});
  (scale * parts.loss).backward();
  return {parts.loss.detach(), parts.nll.detach(), parts.z_loss.detach(), hidden.grad(), weight.grad()};
}

using FusedFn = std::function<FusedCrossEntropy(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                double, int64_t, int64_t)>;

Outcome chunked(const FusedFn& fn, const Problem& p, double coef, int64_t chunk_rows, double scale) {
  torch::Tensor hidden = leaf(p.hidden), weight = leaf(p.weight);
  FusedCrossEntropy parts = fn(hidden, weight, p.targets, coef, chunk_rows, kIgnoreIndex);
  EXPECT_EQ(parts.loss.scalar_type(), torch::kFloat);
  EXPECT_EQ(parts.loss.dim(), 0);
  (scale * parts.loss).backward();
  EXPECT_EQ(hidden.grad().scalar_type(), p.hidden.scalar_type());
  EXPECT_EQ(weight.grad().scalar_type(), torch::kFloat);
  return {parts.loss.detach(), parts.nll.detach(), parts.z_loss.detach(), hidden.grad(), weight.grad()};
}

void expect_close(const Outcome& actual, const Outcome& expected, double tolerance, const std::string& label) {
  EXPECT_LE(scaled_error(actual.loss, expected.loss), tolerance) << label << " loss";
  EXPECT_LE(scaled_error(actual.nll, expected.nll), tolerance) << label << " nll";
  if (expected.z_loss.abs().item<double>() > 0.0) {
    EXPECT_LE(scaled_error(actual.z_loss, expected.z_loss), tolerance) << label << " z_loss";
  } else {
    EXPECT_EQ(actual.z_loss.item<double>(), 0.0) << label << " z_loss";
  }
  EXPECT_LE(scaled_error(actual.grad_hidden, expected.grad_hidden), tolerance) << label << " grad_hidden";
  EXPECT_LE(scaled_error(actual.grad_weight, expected.grad_weight), tolerance) << label << " grad_weight";
}

TEST(KernelCrossEntropy, ReferenceMatchesVocabParallelCrossEntropyInFp32) {
  const int64_t N = 10, C = 16, V = 37;
  const Problem p = make_problem(N, C, V, torch::kFloat, torch::kCPU, 3);
  for (double coef : {0.0, 0.05}) {
    const Outcome expected = unfused(p, coef, 2.5);
    if (coef > 0.0) {
      ASSERT_GT(expected.z_loss.item<double>(), 1e-4);  // the z-loss term is really exercised
    }
    for (int64_t chunk_rows : {1, 3, 5, 10, 64}) {  // 3 does not divide 10; 64 > N
      const std::string label = "coef " + std::to_string(coef) + ", chunk_rows " + std::to_string(chunk_rows);
      expect_close(chunked(fused_linear_cross_entropy_reference, p, coef, chunk_rows, 2.5), expected, 1e-5, label);
      // On CPU the dispatching entry point is the reference, exactly.
      const Outcome dispatched = chunked(fused_linear_cross_entropy, p, coef, chunk_rows, 2.5);
      const Outcome reference = chunked(fused_linear_cross_entropy_reference, p, coef, chunk_rows, 2.5);
      EXPECT_TRUE(torch::equal(dispatched.grad_weight, reference.grad_weight)) << label;
      EXPECT_TRUE(torch::equal(dispatched.loss, reference.loss)) << label;
    }
  }
}

TEST(KernelCrossEntropy, NllIsTheTextbookCrossEntropy) {
  // An independent formula in double: -log softmax(hidden @ weight^T)[target], averaged.
  const Problem p = make_problem(9, 8, 23, torch::kFloat, torch::kCPU, 5);
  torch::Tensor logits = p.hidden.to(torch::kDouble).matmul(p.weight.to(torch::kDouble).t());  // [N, V]
  torch::Tensor expected = -torch::log_softmax(logits, -1).gather(-1, p.targets.unsqueeze(-1)).mean();
  torch::Tensor log_z2 = torch::logsumexp(logits, -1).pow(2).mean();
  FusedCrossEntropy parts = fused_linear_cross_entropy_reference(p.hidden, p.weight, p.targets, 0.01, 4);
  EXPECT_NEAR(parts.nll.item<double>(), expected.item<double>(), 1e-5);
  EXPECT_NEAR(parts.z_loss.item<double>(), 0.01 * log_z2.item<double>(), 1e-6);
  EXPECT_NEAR(parts.loss.item<double>(), (expected + 0.01 * log_z2).item<double>(), 1e-5);
}

TEST(KernelCrossEntropy, ReferenceMatchesTheUnfusedHeadInBf16) {
  const Problem p = make_problem(33, 32, 101, torch::kBFloat16, torch::kCPU, 7);
  for (double coef : {0.0, 1e-3}) {
    expect_close(chunked(fused_linear_cross_entropy_reference, p, coef, 8, 1.0), unfused(p, coef, 1.0), 2e-2,
                 "bf16 coef " + std::to_string(coef));
  }
}

TEST(KernelCrossEntropy, WithoutGradModeOnlyTheLossesAreComputed) {
  const Problem p = make_problem(6, 8, 11, torch::kFloat, torch::kCPU, 9);
  torch::Tensor hidden = leaf(p.hidden), weight = leaf(p.weight);
  FusedCrossEntropy with_grad = fused_linear_cross_entropy(hidden, weight, p.targets, 0.1, 4);
  EXPECT_TRUE(with_grad.loss.requires_grad());
  EXPECT_FALSE(with_grad.nll.requires_grad());  // reported, not differentiated
  torch::NoGradGuard no_grad;
  FusedCrossEntropy eval = fused_linear_cross_entropy(hidden, weight, p.targets, 0.1, 4);
  EXPECT_FALSE(eval.loss.requires_grad());
  EXPECT_NEAR(eval.loss.item<double>(), with_grad.loss.item<double>(), 1e-6);
  EXPECT_NEAR(eval.z_loss.item<double>(), with_grad.z_loss.item<double>(), 1e-6);
}

TEST(KernelCrossEntropy, BadInputIsRefusedNamingTheArgument) {
  const Problem p = make_problem(4, 8, 11, torch::kFloat, torch::kCPU, 11);
  auto call = [&](const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& t, double coef, int64_t rows) {
    return error_of([&] { fused_linear_cross_entropy(h, w, t, coef, rows); });
  };
  EXPECT_NE(call(p.hidden.flatten(), p.weight, p.targets, 0, 2).find("hidden must be [N, C]"), std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight.narrow(1, 0, 4), p.targets, 0, 2).find("weight must be [V, C] with C = hidden's 8"),
            std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight, p.targets.narrow(0, 0, 3), 0, 2).find("targets must be [N]"), std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight, p.targets.to(torch::kInt), 0, 2).find("targets must be int64"), std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight, p.targets.fill_(11), 0, 2).find("targets must lie in [0, 11)"), std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight, p.targets.fill_(-1), 0, 2)
                .find("targets must lie in [0, 11) or equal ignore_index -100"),
            std::string::npos);
  p.targets.fill_(0);
  EXPECT_NE(call(p.hidden, p.weight, p.targets, 0, 0).find("chunk_rows must be > 0"), std::string::npos);
  EXPECT_NE(call(p.hidden, p.weight, p.targets, -0.1, 2).find("z_loss_coef must be >= 0"), std::string::npos);
  EXPECT_NE(call(p.hidden.to(torch::kInt), p.weight, p.targets, 0, 2).find("hidden must be floating point"),
            std::string::npos);
}

TEST(KernelCrossEntropy, ChunkRowsKeepTheLogitsChunkAboutTheSizeOfHidden) {
  EXPECT_EQ(cross_entropy_chunk_rows(8192, 32000, 4096), 1024);  // ceil(32000 / 4096) = 8 -> 8192 / 8
  EXPECT_EQ(cross_entropy_chunk_rows(1000, 50, 32), 512);        // 1000 / 2 = 500 -> the next power of two
  EXPECT_EQ(cross_entropy_chunk_rows(10, 16, 64), 10);           // V <= C: everything in one chunk
  EXPECT_EQ(cross_entropy_chunk_rows(3, 1000000, 8), 1);
  EXPECT_NE(error_of([] { cross_entropy_chunk_rows(0, 10, 10); }).find("must be > 0"), std::string::npos);
}

// The CUDA kernel (fused_linear_cross_entropy on a GPU) against the reference on the same inputs.
TEST(KernelCrossEntropy, FusedKernelMatchesTheReference) {
  if (!torch::cuda::is_available() || !cuda_kernels_built()) {
    GTEST_SKIP() << "needs a CUDA device and a build with kernels/cuda (KEEL_CUDA=ON)";
  }
  struct Case {
    int64_t N, C, V, chunk_rows;
    torch::ScalarType dtype;
    double tolerance;
  };
  // Odd vocabularies take the scalar path of the kernel, multiples of 8 the 16-byte vectors; chunks of 16 rows
  // do not divide 67.
  const std::vector<Case> cases = {{67, 64, 1001, 16, torch::kFloat, 1e-5},
                                   {67, 64, 4096, 16, torch::kFloat, 1e-5},
                                   {67, 64, 1001, 16, torch::kBFloat16, 1e-2},
                                   {130, 128, 32000, 64, torch::kBFloat16, 1e-2},
                                   {5, 32, 3, 2, torch::kBFloat16, 1e-2}};
  for (const Case& c : cases) {
    for (double coef : {0.0, 1e-3}) {
      const std::string label = "N " + std::to_string(c.N) + " V " + std::to_string(c.V) + " " +
                                std::string(c10::toString(c.dtype)) + " coef " + std::to_string(coef);
      const Problem p = make_problem(c.N, c.C, c.V, c.dtype, torch::kCUDA, 17);
      const Outcome fused = chunked(fused_linear_cross_entropy, p, coef, c.chunk_rows, 0.5);
      const Outcome reference = chunked(fused_linear_cross_entropy_reference, p, coef, c.chunk_rows, 0.5);
      EXPECT_TRUE(fused.loss.is_cuda()) << label;
      expect_close(fused, reference, c.tolerance, label);
    }
  }
}

}  // namespace
}  // namespace keel::kernels

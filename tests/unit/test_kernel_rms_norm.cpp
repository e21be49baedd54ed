// Why: kernels::rms_norm replaces the model's RMSNorm, so it must (1) compute exactly what NormImpl computes on
// CPU, (2) have a written-out backward equal to LibTorch autograd of that forward, (3) reject malformed input
// naming the argument, and (4) on a GPU, give the reference's forward and gradients (to bf16/fp32 rounding) from
// the fused kernel, including sizes that fill no block exactly, and the same grad_weight bits on every call.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "core/model/llama.h"
#include "kernels/dispatch.h"
#include "kernels/rms_norm.h"
#include "tests/unit/test_support.h"

namespace {

using keel::testing::error_of;
using keel::testing::relative_error;

namespace kn = keel::kernels;
constexpr double kEps = 1e-5;

// Shapes [..., C] with odd sizes, plus two drawn at random.
std::vector<std::vector<int64_t>> test_shapes() {
  std::vector<std::vector<int64_t>> shapes = {{5}, {3, 7}, {2, 5, 33}, {4, 129}, {2, 3, 4, 17}};
  torch::manual_seed(7);
  for (int i = 0; i < 2; ++i) {
    shapes.push_back({torch::randint(1, 9, {1}).item<int64_t>(), torch::randint(2, 300, {1}).item<int64_t>()});
  }
  return shapes;
}

struct Inputs {
  torch::Tensor x, weight, grad_y;
};

Inputs random_inputs(const std::vector<int64_t>& shape, torch::ScalarType x_dtype, torch::ScalarType w_dtype,
                     torch::Device device = torch::kCPU) {
  const auto opts = torch::TensorOptions().device(device);
  Inputs in;
  in.x = (torch::randn(shape, opts.dtype(torch::kFloat)) * 3.0).to(x_dtype);
  in.weight = (1.0 + 0.5 * torch::randn({shape.back()}, opts.dtype(torch::kFloat))).to(w_dtype);
  in.grad_y = torch::randn(shape, opts.dtype(torch::kFloat)).to(x_dtype);
  return in;
}

TEST(KernelRmsNorm, ReferenceBackwardMatchesAutograd) {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const auto& shape : test_shapes()) {
      const Inputs in = random_inputs(shape, dtype, dtype);
      torch::Tensor x = in.x.clone().requires_grad_(true);
      torch::Tensor w = in.weight.clone().requires_grad_(true);
      kn::rms_norm_reference(x, w, kEps).backward(in.grad_y);
      const kn::RmsNormGrads explicit_grads = kn::rms_norm_backward_reference(in.grad_y, in.x, in.weight, kEps);
      const double tol = dtype == torch::kDouble ? 1e-10 : 2e-5;
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape));
      EXPECT_EQ(explicit_grads.x.scalar_type(), dtype);
      EXPECT_EQ(explicit_grads.weight.scalar_type(), dtype);
      EXPECT_LE(relative_error(explicit_grads.x, x.grad()), tol);
      EXPECT_LE(relative_error(explicit_grads.weight, w.grad()), tol);
    }
  }
}

TEST(KernelRmsNorm, MatchesModelNormOnCpu) {
  torch::manual_seed(11);
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    keel::model::Norm norm(33, keel::NormKind::kRmsNorm, kEps);
    {
      torch::NoGradGuard no_grad;
      norm->weight.copy_(1.0 + 0.3 * torch::randn({33}));
    }
    const torch::Tensor x = (torch::randn({4, 6, 33}) * 2.0).to(dtype);
    const torch::Tensor y = kn::rms_norm(x, norm->weight, kEps);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(y, norm->forward(x))) << "dtype " << dtype;
  }
}

TEST(KernelRmsNorm, CpuOpGivesReferenceForwardAndGradients) {
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    const auto w_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
    for (const auto& shape : test_shapes()) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape));
      const Inputs in = random_inputs(shape, dtype, w_dtype);
      torch::Tensor x_op = in.x.clone().requires_grad_(true);
      torch::Tensor w_op = in.weight.clone().requires_grad_(true);
      const torch::Tensor y = kn::rms_norm(x_op, w_op, kEps);
      y.backward(in.grad_y);
      torch::Tensor x_ref = in.x.clone().requires_grad_(true);
      torch::Tensor w_ref = in.weight.clone().requires_grad_(true);
      const torch::Tensor y_ref = kn::rms_norm_reference(x_ref, w_ref, kEps);
      y_ref.backward(in.grad_y);
      EXPECT_TRUE(torch::equal(y, y_ref));
      ASSERT_TRUE(x_op.grad().defined() && w_op.grad().defined());
      EXPECT_EQ(x_op.grad().scalar_type(), dtype);
      EXPECT_EQ(w_op.grad().scalar_type(), w_dtype);
      // bf16: the explicit backward rounds grad_x once, autograd of the reference rounds on the way too.
      const double tol = dtype == torch::kDouble ? 1e-10 : dtype == torch::kFloat ? 2e-5 : 1e-2;
      EXPECT_LE(relative_error(x_op.grad(), x_ref.grad()), tol);
      EXPECT_LE(relative_error(w_op.grad(), w_ref.grad()), dtype == torch::kBFloat16 ? 1e-2 : tol);
    }
  }
}

TEST(KernelRmsNorm, RejectsBadInput) {
  const torch::Tensor x = torch::randn({3, 8});
  const torch::Tensor w = torch::ones({8});
  auto expect_names = [](const std::string& message, const std::string& word) {
    EXPECT_NE(message.find(word), std::string::npos) << "message: " << message;
  };
  expect_names(error_of([&] { kn::rms_norm(torch::tensor(1.0f), torch::ones({1}), kEps); }), "x must be [..., C]");
  expect_names(error_of([&] { kn::rms_norm(torch::ones({3, 8}, torch::kLong), w, kEps); }), "x must be floating");
  expect_names(error_of([&] { kn::rms_norm(x, torch::ones({8, 1}), kEps); }), "weight must be 1-d");
  expect_names(error_of([&] { kn::rms_norm(x, torch::ones({7}), kEps); }), "weight has 7 elements");
  expect_names(error_of([&] { kn::rms_norm(x, w.to(torch::kBFloat16), kEps); }), "weight must be Float");
  expect_names(error_of([&] { kn::rms_norm(x.to(torch::kDouble), w, kEps); }), "weight must be Double");
  expect_names(error_of([&] { kn::rms_norm(x, torch::Tensor(), kEps); }), "weight is undefined");
  expect_names(error_of([&] { kn::rms_norm_reference(x, torch::ones({9}), kEps); }), "rms_norm_reference: weight");
  expect_names(error_of([&] { kn::rms_norm_backward_reference(torch::ones({3, 7}), x, w, kEps); }), "grad_y");
}

TEST(KernelRmsNorm, FusedMatchesReferenceOnGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!kn::cuda_kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels (KEEL_WITH_CUDA off)";
  if (!kn::use_fused(torch::empty({1}, torch::kCUDA))) GTEST_SKIP() << "KEEL_DISABLE_FUSED_KERNELS is set";
  torch::manual_seed(5);
  // Rows of 1, 3 and several warps; C filling no block exactly; C > 12256 (grad_weight partials in global memory),
  // and the shared-memory boundary itself: 12256 (the last C in shared), 12257 and 12288 (rms_norm_geometry.h).
  const std::vector<std::vector<int64_t>> shapes = {{3, 129},   {2, 7, 1000}, {64, 4096},     {5, 13001},
                                                    {1000, 64}, {7, 3},       {2, 9, 4, 128}, {300, 2500},
                                                    {3, 12256}, {3, 12257},   {2, 12288}};
  for (const auto dtype : {torch::kBFloat16, torch::kFloat, torch::kHalf}) {
    const double tol = dtype == torch::kFloat ? 2e-5 : 1e-2;
    for (const auto& shape : shapes) {
      for (const bool transposed_view : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape)
                                          << (transposed_view ? " (non-contiguous x)" : ""));
        Inputs in = random_inputs(shape, dtype, torch::kFloat, torch::kCUDA);
        torch::Tensor x = in.x.clone();
        if (transposed_view) {  // the same values, stored transposed in the last two dims
          if (shape.size() < 2) continue;
          x = in.x.transpose(-1, -2).contiguous().transpose(-1, -2);
          ASSERT_FALSE(x.is_contiguous());
        }
        x.requires_grad_(true);
        torch::Tensor w = in.weight.clone().requires_grad_(true);
        const torch::Tensor y = kn::rms_norm(x, w, kEps);
        y.backward(in.grad_y);

        const torch::Tensor x32 = in.x.to(torch::kCPU).to(torch::kFloat);
        const torch::Tensor w32 = in.weight.to(torch::kCPU);
        const torch::Tensor y_ref = kn::rms_norm_reference(x32, w32, kEps);
        const kn::RmsNormGrads ref =
            kn::rms_norm_backward_reference(in.grad_y.to(torch::kCPU).to(torch::kFloat), x32, w32, kEps);
        ASSERT_TRUE(y.is_cuda());
        EXPECT_EQ(y.scalar_type(), dtype);
        EXPECT_EQ(x.grad().scalar_type(), dtype);
        EXPECT_EQ(w.grad().scalar_type(), torch::kFloat);
        EXPECT_LE(relative_error(y, y_ref), tol);
        EXPECT_LE(relative_error(x.grad(), ref.x), tol);
        EXPECT_LE(relative_error(w.grad(), ref.weight), dtype == torch::kFloat ? 2e-5 : 1e-3);

        // grad_weight is summed in a fixed order: a second backward gives the same bits.
        torch::Tensor w_again = in.weight.clone().requires_grad_(true);
        kn::rms_norm(in.x, w_again, kEps).backward(in.grad_y);
        EXPECT_TRUE(torch::equal(w_again.grad(), w.grad()));
      }
    }
  }
}

}  // namespace

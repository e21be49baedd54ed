// Why: kernels::apply_rotary replaces the model's RoPE, so it must (1) give bit-identical results to
// model::apply_rotary on CPU for full, partial and zero rotary dims and for non-contiguous views, (2) have a
// written-out backward (the inverse rotation) equal to LibTorch autograd of the forward, (3) reject malformed
// shapes and tables naming the argument, and (4) on a GPU, give the reference's forward and gradient from the
// fused kernel (to bf16/fp32 rounding), for odd head dims and sequence lengths shorter than the tables.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "core/model/llama.h"
#include "kernels/dispatch.h"
#include "kernels/rotary.h"
#include "tests/unit/test_support.h"

namespace {

using keel::testing::error_of;
using keel::testing::relative_error;

namespace kn = keel::kernels;
using keel::model::make_rotary_tables;
using keel::model::RotaryTables;

constexpr double kTheta = 10000.0;

struct Case {
  std::vector<int64_t> shape;  // [B, T, H, D]
  double rotary_fraction;
  int64_t table_len;  // >= T
};

// Full, partial (pass-through dims) and two-dim rotary; odd H and D; tables longer than T.
std::vector<Case> test_cases() {
  std::vector<Case> cases = {{{2, 5, 3, 8}, 1.0, 5},  {{1, 7, 2, 16}, 0.5, 12}, {{2, 3, 5, 10}, 0.25, 9},
                             {{3, 4, 1, 6}, 0.34, 4}, {{1, 9, 4, 33}, 1.0, 16}, {{2, 6, 3, 33}, 0.5, 20}};
  torch::manual_seed(13);
  for (int i = 0; i < 2; ++i) {
    const int64_t T = torch::randint(1, 20, {1}).item<int64_t>();
    cases.push_back({{torch::randint(1, 4, {1}).item<int64_t>(), T, torch::randint(1, 6, {1}).item<int64_t>(),
                      torch::randint(2, 70, {1}).item<int64_t>()},
                     i == 0 ? 1.0 : 0.5,
                     T + 3});
  }
  return cases;
}

std::string describe(const Case& c) {
  return (::testing::Message() << "shape " << torch::IntArrayRef(c.shape) << " rotary_fraction " << c.rotary_fraction
                               << " table_len " << c.table_len)
      .GetString();
}

// The same values as x, as a view into a tensor whose rows are 3 elements longer (non-contiguous unless x has a
// single row), like the q/k views the attention hands over.
torch::Tensor padded_view(const torch::Tensor& x) {
  return torch::cat({x, torch::zeros({x.size(0), x.size(1), x.size(2), 3}, x.options())}, -1).narrow(-1, 0, x.size(3));
}

TEST(KernelRope, MatchesModelOnCpu) {
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const Case& c : test_cases()) {
      SCOPED_TRACE(describe(c) + " dtype " + c10::toString(dtype));
      const RotaryTables tables = make_rotary_tables(c.shape[3], c.rotary_fraction, kTheta, c.table_len);
      const torch::Tensor x = torch::randn(c.shape).to(dtype);
      const torch::Tensor y = kn::apply_rotary(x, tables.cos, tables.sin, tables.rotary_dims);
      EXPECT_EQ(y.scalar_type(), dtype);
      EXPECT_TRUE(torch::equal(y, keel::model::apply_rotary(x, tables)));
      // A non-contiguous view (as q/k are after the projection's view) gives the same as its contiguous copy.
      const torch::Tensor x_view = padded_view(x);  // [B, T, H, D], strided
      EXPECT_TRUE(torch::equal(kn::apply_rotary(x_view, tables.cos, tables.sin, tables.rotary_dims), y));
    }
  }
  // rotary_fraction small enough for zero rotary dims: x itself comes back, as in the model.
  const RotaryTables none = make_rotary_tables(6, 0.2, kTheta, 4);
  ASSERT_EQ(none.rotary_dims, 0);
  const torch::Tensor x = torch::randn({1, 4, 2, 6});
  EXPECT_TRUE(kn::apply_rotary(x, none.cos, none.sin, 0).is_same(x));
}

TEST(KernelRope, ReferenceBackwardMatchesAutograd) {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const Case& c : test_cases()) {
      SCOPED_TRACE(describe(c) + " dtype " + c10::toString(dtype));
      const RotaryTables tables = make_rotary_tables(c.shape[3], c.rotary_fraction, kTheta, c.table_len);
      const torch::Tensor x0 = torch::randn(c.shape).to(dtype);
      const torch::Tensor grad = torch::randn(c.shape).to(dtype);
      torch::Tensor x = x0.clone().requires_grad_(true);
      kn::apply_rotary_reference(x, tables.cos, tables.sin, tables.rotary_dims).backward(grad);
      const torch::Tensor explicit_grad =
          kn::apply_rotary_backward_reference(grad, tables.cos, tables.sin, tables.rotary_dims);
      EXPECT_EQ(explicit_grad.scalar_type(), dtype);
      EXPECT_LE(relative_error(explicit_grad, x.grad()), dtype == torch::kDouble ? 1e-12 : 1e-6);
      // A rotation's inverse undoes it (to the fp32 rounding of the tables: cos^2 + sin^2 is 1 within ~1e-7).
      const torch::Tensor round_trip = kn::apply_rotary_backward_reference(
          kn::apply_rotary_reference(x0, tables.cos, tables.sin, tables.rotary_dims), tables.cos, tables.sin,
          tables.rotary_dims);
      EXPECT_LE(relative_error(round_trip, x0), 1e-6);
    }
  }
}

TEST(KernelRope, CpuOpGivesReferenceForwardAndGradients) {
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    for (const Case& c : test_cases()) {
      SCOPED_TRACE(describe(c) + " dtype " + c10::toString(dtype));
      const RotaryTables tables = make_rotary_tables(c.shape[3], c.rotary_fraction, kTheta, c.table_len);
      const torch::Tensor x0 = torch::randn(c.shape).to(dtype);
      const torch::Tensor grad = torch::randn(c.shape).to(dtype);
      torch::Tensor x = x0.clone().requires_grad_(true);
      const torch::Tensor y = kn::apply_rotary(x, tables.cos, tables.sin, tables.rotary_dims);
      y.backward(grad);
      torch::Tensor x_ref = x0.clone().requires_grad_(true);
      const torch::Tensor y_ref = kn::apply_rotary_reference(x_ref, tables.cos, tables.sin, tables.rotary_dims);
      y_ref.backward(grad);
      EXPECT_TRUE(torch::equal(y, y_ref));
      ASSERT_TRUE(x.grad().defined());
      EXPECT_EQ(x.grad().scalar_type(), dtype);
      const double tol = dtype == torch::kDouble ? 1e-12 : dtype == torch::kFloat ? 1e-6 : 1e-2;
      EXPECT_LE(relative_error(x.grad(), x_ref.grad()), tol);
    }
  }
}

TEST(KernelRope, RejectsBadInput) {
  const RotaryTables t = make_rotary_tables(8, 1.0, kTheta, 6);  // cos, sin: [6, 4]
  const torch::Tensor x = torch::randn({2, 6, 3, 8});
  auto expect_names = [](const std::string& message, const std::string& word) {
    EXPECT_NE(message.find(word), std::string::npos) << "message: " << message;
  };
  expect_names(error_of([&] { kn::apply_rotary(torch::randn({6, 3, 8}), t.cos, t.sin, 8); }), "x must be 4-d");
  expect_names(error_of([&] { kn::apply_rotary(x.to(torch::kLong), t.cos, t.sin, 8); }), "x must be floating");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos, t.sin, 7); }), "rotary_dims must be even");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos, t.sin, 10); }), "rotary_dims must be even and in [0, D = 8]");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos, t.sin, 6); }), "cos must be [T_max >= T = 6");
  expect_names(error_of([&] { kn::apply_rotary(torch::randn({2, 7, 3, 8}), t.cos, t.sin, 8); }), "cos must be");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos, t.sin.narrow(1, 0, 3), 8); }), "sin must be");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos.to(torch::kDouble), t.sin, 8); }), "cos must be float32");
  expect_names(error_of([&] { kn::apply_rotary(x, t.cos, t.sin.clone().requires_grad_(true), 8); }),
               "sin is a constant table");
  expect_names(error_of([&] { kn::apply_rotary(x, torch::Tensor(), t.sin, 8); }), "cos is undefined");
  expect_names(error_of([&] {
                 kn::apply_rotary_backward_reference(torch::randn({6, 8}), t.cos, t.sin, 8);
               }),
               "apply_rotary_backward_reference: x must be 4-d");
}

TEST(KernelRope, FusedMatchesReferenceOnGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!kn::cuda_kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels (KEEL_WITH_CUDA off)";
  if (!kn::use_fused(torch::empty({1}, torch::kCUDA))) GTEST_SKIP() << "KEEL_DISABLE_FUSED_KERNELS is set";
  torch::manual_seed(17);
  std::vector<Case> cases = test_cases();
  cases.push_back({{4, 1024, 8, 128}, 1.0, 2048});  // a model-sized head, many blocks
  cases.push_back({{2, 333, 5, 96}, 0.25, 400});
  for (const auto dtype : {torch::kBFloat16, torch::kFloat, torch::kHalf}) {
    const double tol = dtype == torch::kFloat ? 1e-5 : 1e-2;
    for (const Case& c : cases) {
      for (const bool tables_on_gpu : {false, true}) {
        SCOPED_TRACE(describe(c) + " dtype " + c10::toString(dtype) + (tables_on_gpu ? " tables on GPU" : ""));
        RotaryTables tables = make_rotary_tables(c.shape[3], c.rotary_fraction, kTheta, c.table_len);
        if (tables.rotary_dims == 0) continue;
        if (tables_on_gpu) {
          tables.cos = tables.cos.to(torch::kCUDA);
          tables.sin = tables.sin.to(torch::kCUDA);
        }
        const torch::Tensor x0 = torch::randn(c.shape, torch::kCUDA).to(dtype);
        const torch::Tensor grad = torch::randn(c.shape, torch::kCUDA).to(dtype);
        // A non-contiguous view, as q/k are: the op makes it contiguous.
        torch::Tensor x = padded_view(x0).requires_grad_(true);
        const torch::Tensor y = kn::apply_rotary(x, tables.cos, tables.sin, tables.rotary_dims);
        y.backward(grad);

        const torch::Tensor x32 = x0.to(torch::kCPU).to(torch::kFloat);
        const torch::Tensor cos = tables.cos.to(torch::kCPU), sin = tables.sin.to(torch::kCPU);
        const torch::Tensor y_ref = kn::apply_rotary_reference(x32, cos, sin, tables.rotary_dims);
        const torch::Tensor grad_ref =
            kn::apply_rotary_backward_reference(grad.to(torch::kCPU).to(torch::kFloat), cos, sin, tables.rotary_dims);
        ASSERT_TRUE(y.is_cuda());
        EXPECT_EQ(y.scalar_type(), dtype);
        EXPECT_EQ(x.grad().scalar_type(), dtype);
        EXPECT_LE(relative_error(y, y_ref), tol);
        EXPECT_LE(relative_error(x.grad(), grad_ref), tol);
        // The pass-through dims are copied, not rounded through fp32 arithmetic.
        const int64_t D = c.shape[3], R = tables.rotary_dims;
        if (R < D) {
          EXPECT_TRUE(torch::equal(y.narrow(-1, R, D - R), x0.narrow(-1, R, D - R)));
        }
      }
    }
  }
}

}  // namespace

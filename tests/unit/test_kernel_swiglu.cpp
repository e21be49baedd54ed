// Why: kernels::swiglu replaces the MLP's silu(gate) * up, so it must (1) compute exactly the model's expression on
// CPU, (2) have a written-out backward equal to LibTorch autograd of that forward, (3) reject mismatched inputs
// naming the argument, and (4) on a GPU, give the reference's forward and gradients (to bf16/fp32 rounding) from
// the fused kernel, for sizes that fill no 16-byte pack or block exactly and for misaligned views.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/swiglu.h"
#include "tests/unit/test_support.h"

namespace {

using keel::testing::error_of;
using keel::testing::relative_error;

namespace kn = keel::kernels;

std::vector<std::vector<int64_t>> test_shapes() {
  std::vector<std::vector<int64_t>> shapes = {{1}, {7}, {3, 5}, {2, 3, 33}, {4, 129}};
  torch::manual_seed(3);
  for (int i = 0; i < 2; ++i) {
    shapes.push_back({torch::randint(1, 6, {1}).item<int64_t>(), torch::randint(1, 17, {1}).item<int64_t>(),
                      torch::randint(1, 300, {1}).item<int64_t>()});
  }
  return shapes;
}

struct Inputs {
  torch::Tensor gate, up, grad;
};

Inputs random_inputs(const std::vector<int64_t>& shape, torch::ScalarType dtype, torch::Device device = torch::kCPU) {
  const auto f32 = torch::TensorOptions().device(device).dtype(torch::kFloat);
  return {(torch::randn(shape, f32) * 4.0).to(dtype), torch::randn(shape, f32).to(dtype),
          torch::randn(shape, f32).to(dtype)};
}

TEST(KernelSwiGlu, ReferenceBackwardMatchesAutograd) {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const auto& shape : test_shapes()) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape));
      const Inputs in = random_inputs(shape, dtype);
      torch::Tensor gate = in.gate.clone().requires_grad_(true);
      torch::Tensor up = in.up.clone().requires_grad_(true);
      kn::swiglu_reference(gate, up).backward(in.grad);
      const kn::SwiGluGrads explicit_grads = kn::swiglu_backward_reference(in.grad, in.gate, in.up);
      const double tol = dtype == torch::kDouble ? 1e-12 : 1e-6;
      EXPECT_EQ(explicit_grads.gate.scalar_type(), dtype);
      EXPECT_EQ(explicit_grads.up.scalar_type(), dtype);
      EXPECT_LE(relative_error(explicit_grads.gate, gate.grad()), tol);
      EXPECT_LE(relative_error(explicit_grads.up, up.grad()), tol);
    }
  }
}

TEST(KernelSwiGlu, CpuOpGivesModelExpressionAndReferenceGradients) {
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    for (const auto& shape : test_shapes()) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape));
      const Inputs in = random_inputs(shape, dtype);
      torch::Tensor gate = in.gate.clone().requires_grad_(true);
      torch::Tensor up = in.up.clone().requires_grad_(true);
      const torch::Tensor y = kn::swiglu(gate, up);
      EXPECT_EQ(y.scalar_type(), dtype);
      EXPECT_TRUE(torch::equal(y, torch::silu(in.gate) * in.up));  // core/model/ops.cpp swiglu
      y.backward(in.grad);
      torch::Tensor gate_ref = in.gate.clone().requires_grad_(true);
      torch::Tensor up_ref = in.up.clone().requires_grad_(true);
      kn::swiglu_reference(gate_ref, up_ref).backward(in.grad);
      ASSERT_TRUE(gate.grad().defined() && up.grad().defined());
      EXPECT_EQ(gate.grad().scalar_type(), dtype);
      EXPECT_EQ(up.grad().scalar_type(), dtype);
      // bf16: the op computes the gradient in fp32 and rounds once; autograd of the bf16 reference rounds often.
      const double tol = dtype == torch::kDouble ? 1e-12 : dtype == torch::kFloat ? 1e-6 : 2e-2;
      EXPECT_LE(relative_error(gate.grad(), gate_ref.grad()), tol);
      EXPECT_LE(relative_error(up.grad(), up_ref.grad()), tol);
    }
  }
}

TEST(KernelSwiGlu, RejectsBadInput) {
  const torch::Tensor gate = torch::randn({3, 8});
  auto expect_names = [](const std::string& message, const std::string& word) {
    EXPECT_NE(message.find(word), std::string::npos) << "message: " << message;
  };
  expect_names(error_of([&] { kn::swiglu(gate, torch::randn({3, 7})); }), "up has shape [3, 7] but gate has [3, 8]");
  expect_names(error_of([&] { kn::swiglu(gate, torch::randn({8, 3})); }), "up has shape");
  expect_names(error_of([&] { kn::swiglu(gate, torch::randn({3, 8}, torch::kDouble)); }), "up is Double");
  expect_names(error_of([&] {
                 kn::swiglu(torch::ones({3, 8}, torch::kLong), torch::ones({3, 8}, torch::kLong));
               }),
               "gate must be floating");
  expect_names(error_of([&] { kn::swiglu(torch::Tensor(), gate); }), "gate is undefined");
  expect_names(error_of([&] { kn::swiglu_reference(gate, torch::Tensor()); }), "swiglu_reference: up is undefined");
  expect_names(error_of([&] { kn::swiglu_backward_reference(torch::ones({2}), gate, gate); }), "grad has shape");
}

TEST(KernelSwiGlu, FusedMatchesReferenceOnGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!kn::cuda_kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels (KEEL_WITH_CUDA off)";
  if (!kn::use_fused(torch::empty({1}, torch::kCUDA))) GTEST_SKIP() << "KEEL_DISABLE_FUSED_KERNELS is set";
  torch::manual_seed(9);
  // Element counts below one pack, one pack, a pack plus a tail, several blocks plus a tail, and > 2^20.
  const std::vector<std::vector<int64_t>> shapes = {{1}, {7}, {8}, {3, 5}, {4, 1027}, {2, 17, 2049}, {1000003}};
  for (const auto dtype : {torch::kBFloat16, torch::kFloat, torch::kHalf}) {
    const double tol = dtype == torch::kFloat ? 1e-5 : 1e-2;
    for (const auto& shape : shapes) {
      for (const bool misaligned : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "dtype " << dtype << " shape " << torch::IntArrayRef(shape)
                                          << (misaligned ? " (views starting one element in)" : ""));
        Inputs in = random_inputs(shape, dtype, torch::kCUDA);
        if (misaligned) {  // the same values, stored one element past a 16-byte boundary: the element-wise path
          auto shift = [](const torch::Tensor& t) {
            return torch::cat({torch::zeros({1}, t.options()), t.reshape({-1})})
                .narrow(0, 1, t.numel())
                .view(t.sizes());
          };
          in = {shift(in.gate), shift(in.up), shift(in.grad)};
          ASSERT_NE(reinterpret_cast<std::uintptr_t>(in.gate.data_ptr()) % 16, 0u);
        }
        torch::Tensor gate = in.gate.detach().requires_grad_(true);
        torch::Tensor up = in.up.detach().requires_grad_(true);
        const torch::Tensor y = kn::swiglu(gate, up);
        y.backward(in.grad);

        const torch::Tensor gate32 = in.gate.to(torch::kCPU).to(torch::kFloat);
        const torch::Tensor up32 = in.up.to(torch::kCPU).to(torch::kFloat);
        const torch::Tensor y_ref = kn::swiglu_reference(gate32, up32);
        const kn::SwiGluGrads ref =
            kn::swiglu_backward_reference(in.grad.to(torch::kCPU).to(torch::kFloat), gate32, up32);
        ASSERT_TRUE(y.is_cuda());
        EXPECT_EQ(y.scalar_type(), dtype);
        EXPECT_EQ(gate.grad().scalar_type(), dtype);
        EXPECT_EQ(up.grad().scalar_type(), dtype);
        EXPECT_LE(relative_error(y, y_ref), tol);
        EXPECT_LE(relative_error(gate.grad(), ref.gate), tol);
        EXPECT_LE(relative_error(up.grad(), ref.up), tol);
      }
    }
  }
}

}  // namespace

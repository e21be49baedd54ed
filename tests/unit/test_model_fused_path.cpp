// Why: on a GPU the model routes RMSNorm, RoPE, SwiGLU and the head + cross-entropy through kernels/ ops with
// explicit backwards and a chunked loss. Those ops' CUDA kernels are tested against their references on a GPU;
// this test covers everything around them on any machine: with the fused path forced onto CPU (the ops then run
// their references inside the same autograd wrappers), the model's losses and every gradient must equal the plain
// LibTorch path's.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "core/model/llama.h"
#include "kernels/dispatch.h"
#include "tests/unit/test_support.h"

using keel::ModelConfig;
using keel::model::Llama;

namespace {

struct LossAndGrads {
  double loss = 0.0, nll = 0.0, z_loss = 0.0;
  std::map<std::string, torch::Tensor> grads;
};

LossAndGrads run(const ModelConfig& c, const torch::Tensor& window, torch::ScalarType dtype, bool fused) {
  keel::kernels::set_fused_ops_on_cpu(fused);
  Llama model(c);
  model->init_weights(11);
  auto parts = model->loss(window, dtype);
  parts.loss.backward();
  keel::kernels::set_fused_ops_on_cpu(false);
  LossAndGrads out{parts.loss.item<double>(), parts.nll.item<double>(), parts.z_loss.item<double>(), {}};
  for (const auto& item : model->named_parameters()) out.grads[item.key()] = item.value().grad().clone();
  return out;
}

void expect_fused_path_matches(const ModelConfig& c, torch::ScalarType dtype, double rtol, double atol) {
  torch::manual_seed(5);
  const torch::Tensor window = torch::randint(0, c.vocab, {3, c.seq_len + 1}, torch::kLong);  // [B, T+1]
  const LossAndGrads plain = run(c, window, dtype, false);
  const LossAndGrads fused = run(c, window, dtype, true);
  EXPECT_NEAR(fused.loss, plain.loss, atol + rtol * std::abs(plain.loss));
  EXPECT_NEAR(fused.nll, plain.nll, atol + rtol * std::abs(plain.nll));
  EXPECT_NEAR(fused.z_loss, plain.z_loss, atol + rtol * std::abs(plain.z_loss));
  ASSERT_EQ(fused.grads.size(), plain.grads.size());
  for (const auto& [name, g] : plain.grads) {
    const torch::Tensor& f = fused.grads.at(name);
    EXPECT_EQ(f.scalar_type(), torch::kFloat) << name;
    EXPECT_TRUE(torch::allclose(f, g, rtol, atol)) << name << ": max |diff| " << (f - g).abs().max().item<double>()
                                                   << ", max |grad| " << g.abs().max().item<double>();
  }
}

}  // namespace

TEST(ModelFusedPath, Fp32LossAndGradientsEqualThePlainPath) {
  expect_fused_path_matches(keel::testing::small_model_config(16), torch::kFloat, 1e-4, 1e-6);
}

TEST(ModelFusedPath, TiedEmbeddingsZLossPartialRotaryEqualThePlainPath) {
  ModelConfig c = keel::testing::small_model_config(16);
  c.tie_embeddings = true;
  c.z_loss = 1e-3;
  c.rotary_fraction = 0.5;
  expect_fused_path_matches(c, torch::kFloat, 1e-4, 1e-6);
}

TEST(ModelFusedPath, Bf16ComputeStaysWithinBf16OfThePlainPath) {
  // bf16 activations round differently when the ops are fused (one rounding per op instead of several), so
  // the bound is bf16's, relative to each tensor's scale.
  expect_fused_path_matches(keel::testing::small_model_config(16), torch::kBFloat16, 3e-2, 2e-3);
}

TEST(ModelFusedPath, IsOffUnlessAskedOnCpu) {
  const torch::Tensor x = torch::zeros({2, 3});
  EXPECT_FALSE(keel::kernels::use_fused(x));
  EXPECT_FALSE(keel::kernels::model_uses_fused_ops(x));
  keel::kernels::set_fused_ops_on_cpu(true);
  EXPECT_TRUE(keel::kernels::model_uses_fused_ops(x));
  EXPECT_FALSE(keel::kernels::use_fused(x));  // the CUDA kernels themselves never see a CPU tensor
  keel::kernels::set_fused_ops_on_cpu(false);
  EXPECT_FALSE(keel::kernels::model_uses_fused_ops(x));
}

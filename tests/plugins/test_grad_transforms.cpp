// Why: a grad_transform edits gradients in place between clipping and the update, so the tests check exactly
// which tensors change and by how much, and that every other gradient is left bitwise as it was.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

// embed.weight [V=6, C=4], one attention matrix [C, C], the head [V, C]; random gradients.
std::vector<sdk::Param> model_params() {
  at::manual_seed(7);
  std::vector<sdk::Param> params;
  for (const auto& [name, rows] : std::vector<std::pair<std::string, int64_t>>{
           {"embed.weight", 6}, {"blocks.0.attn.wq.weight", 4}, {"head.weight", 6}}) {
    params.push_back(make_param(name, at::randn({rows, 4}), at::randn({rows, 4})));
  }
  return params;
}

std::vector<at::Tensor> grads_of(const std::vector<sdk::Param>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(p.param.grad().clone());
  return grads;
}

void transform(sdk::Plugin& plugin, std::vector<sdk::Param>& params, sdk::StepContext ctx = {}) {
  at::NoGradGuard no_grad;
  plugin.transform_grads(ctx, params);
}

// ------------------------------------------------------------------------------------------------
// embedding_grad_shrink

TEST(EmbeddingGradShrink, ScalesOnlyTheEmbeddingGradientByAlpha) {
  auto shrink = make_plugin("embedding_grad_shrink");
  std::vector<sdk::Param> params = model_params();
  const std::vector<at::Tensor> before = grads_of(params);
  std::map<std::string, double> metrics;
  transform(*shrink, params, context_recording(metrics));
  EXPECT_TRUE(at::equal(params[0].param.grad(), before[0].mul(0.1)));  // bitwise: same op, same inputs
  EXPECT_TRUE(at::equal(params[1].param.grad(), before[1]));
  EXPECT_TRUE(at::equal(params[2].param.grad(), before[2]));
  EXPECT_EQ(metrics.at("shrunk_tensors"), 1.0);
}

TEST(EmbeddingGradShrink, ParamAndAlphaArguments) {
  auto shrink = make_plugin("embedding_grad_shrink", {{"param", "head.weight"}, {"alpha", "0.5"}});
  std::vector<sdk::Param> params = model_params();
  const std::vector<at::Tensor> before = grads_of(params);
  transform(*shrink, params);
  EXPECT_TRUE(at::equal(params[0].param.grad(), before[0]));
  EXPECT_TRUE(at::equal(params[1].param.grad(), before[1]));
  EXPECT_TRUE(at::equal(params[2].param.grad(), before[2].mul(0.5)));
}

TEST(EmbeddingGradShrink, AMissingParamIsAnErrorNamingIt) {
  auto shrink = make_plugin("embedding_grad_shrink", {{"param", "tok_embeddings.weight"}});
  std::vector<sdk::Param> params = model_params();
  const std::string error = error_of([&] { transform(*shrink, params); });
  EXPECT_NE(error.find("no parameter named 'tok_embeddings.weight'"), std::string::npos) << error;
  EXPECT_NE(error.find("embed.weight, blocks.0.attn.wq.weight, head.weight"), std::string::npos) << error;
  // A later pipeline stage does not hold the embedding: nothing to do there, not an error.
  sdk::StepContext later_stage;
  later_stage.pp_size = 2;
  later_stage.pp_rank = 1;
  EXPECT_EQ(error_of([&] { transform(*shrink, params, later_stage); }), "(no exception)");
}

TEST(EmbeddingGradShrink, RefusesBadArguments) {
  EXPECT_NE(refusal_of("embedding_grad_shrink", {{"alpha", "1.5"}}).find("'alpha'"), std::string::npos);
  EXPECT_NE(refusal_of("embedding_grad_shrink", {{"alpha", "-0.1"}}).find("'alpha'"), std::string::npos);
  EXPECT_NE(refusal_of("embedding_grad_shrink", {{"alpha", "tenth"}}).find("'alpha'"), std::string::npos);
  EXPECT_NE(refusal_of("embedding_grad_shrink", {{"param", ""}}).find("'param'"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------ update_clip

double rms(const at::Tensor& t) { return std::sqrt(t.to(at::kDouble).square().mean().item<double>()); }

TEST(UpdateClip, ClipsEachGradientsRmsToMaxRms) {
  auto clip = make_plugin("update_clip");  // max_rms = 1
  std::vector<sdk::Param> params = {
      make_param("a", at::zeros({4}), floats({2.0f, -2.0f, 2.0f, 2.0f})),   // RMS 2 -> scaled by 0.5
      make_param("b", at::zeros({4}), floats({0.5f, -0.5f, 0.5f, -0.5f})),  // RMS 0.5 -> untouched
      make_param("c", at::zeros({2}), floats({3.0f, 4.0f})),                // RMS sqrt(12.5) -> scaled to RMS 1
      make_param("d", at::zeros({2}), floats({1.0f, -1.0f})),               // RMS exactly 1 -> untouched
  };
  const std::vector<at::Tensor> before = grads_of(params);
  std::map<std::string, double> metrics;
  transform(*clip, params, context_recording(metrics));
  EXPECT_TRUE(at::equal(params[0].param.grad(), floats({1.0f, -1.0f, 1.0f, 1.0f})));
  EXPECT_TRUE(at::equal(params[1].param.grad(), before[1]));
  EXPECT_NEAR(rms(params[2].param.grad()), 1.0, 1e-6);
  EXPECT_NEAR(params[2].param.grad()[0].item<double>(), 3.0 / std::sqrt(12.5), 1e-6);
  EXPECT_NEAR(params[2].param.grad()[1].item<double>(), 4.0 / std::sqrt(12.5), 1e-6);
  EXPECT_TRUE(at::equal(params[3].param.grad(), before[3]));
  EXPECT_EQ(metrics.at("clipped_tensors"), 2.0);
}

TEST(UpdateClip, MaxRmsArgumentAndTensorsWithoutGradients) {
  auto clip = make_plugin("update_clip", {{"max_rms", "0.25"}});
  std::vector<sdk::Param> params = {make_param("b", at::zeros({4}), floats({0.5f, -0.5f, 0.5f, -0.5f})),
                                    make_param("no_grad", at::zeros({3}), at::zeros({3}))};
  params[1].param.mutable_grad() = at::Tensor();  // a frozen tensor: no gradient at all
  std::map<std::string, double> metrics;
  transform(*clip, params, context_recording(metrics));
  EXPECT_TRUE(at::equal(params[0].param.grad(), floats({0.25f, -0.25f, 0.25f, -0.25f})));
  EXPECT_FALSE(params[1].param.grad().defined());
  EXPECT_EQ(metrics.at("clipped_tensors"), 1.0);
}

TEST(UpdateClip, LeavesNonFiniteGradientsToKeel) {
  auto clip = make_plugin("update_clip");
  std::vector<sdk::Param> params = {make_param("inf", at::zeros({2}), floats({INFINITY, 1.0f}))};
  const std::vector<at::Tensor> before = grads_of(params);
  transform(*clip, params);
  EXPECT_TRUE(at::equal(params[0].param.grad(), before[0]));
}

TEST(UpdateClip, RefusesBadArguments) {
  for (const std::string bad : {"0", "-1", "inf", "nan", "one"}) {
    EXPECT_NE(refusal_of("update_clip", {{"max_rms", bad}}).find("'max_rms'"), std::string::npos) << bad;
  }
}

}  // namespace
}  // namespace keel::testing

// Why: the model declares each parameter's tensor-parallel split and init role where the layer registers it
// (ShardedModule); parameter_specs() only asks. These tests pin what every layer of the decoder declares, that
// the walk names parameters exactly as named_parameters() does (nested modules included), and that a parameter
// registered without a declaration is reported as such and refused by init_weights instead of guessed from its name.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "core/model/llama.h"
#include "core/model/sharding.h"
#include "tests/unit/test_support.h"

using keel::model::InitRole;
using keel::model::Llama;
using keel::model::ParameterSpec;

namespace {

std::map<std::string, ParameterSpec> specs_of(const torch::nn::Module& m) {
  std::map<std::string, ParameterSpec> out;
  for (const auto& [name, spec] : keel::model::parameter_specs(m)) out[name] = spec;
  return out;
}

void expect_spec(const std::map<std::string, ParameterSpec>& specs, const std::string& name, int64_t dim, bool partial,
                 InitRole init) {
  const auto it = specs.find(name);
  ASSERT_NE(it, specs.end()) << name;
  EXPECT_EQ(it->second.shard.dim, dim) << name;
  EXPECT_EQ(it->second.shard.grad_partial_over_tp, partial) << name;
  EXPECT_EQ(it->second.init, init) << name;
}

// A module that registers a parameter the plain way, declaring nothing.
class Undeclared : public keel::model::ShardedModule {
 public:
  Undeclared() { register_parameter("w", torch::zeros({2})); }
};

}  // namespace

TEST(ModelSharding, EveryLayerDeclaresItsSplitAndInitRole) {
  keel::ModelConfig c = keel::testing::small_model_config(8);
  c.norm = keel::NormKind::kLayerNorm;
  c.qk_norm = true;
  Llama model(c);
  const auto specs = specs_of(*model);
  ASSERT_EQ(specs.size(), model->named_parameters().size());
  expect_spec(specs, "embed.weight", 0, false, InitRole::kNormal);
  expect_spec(specs, "head.weight", 0, false, InitRole::kNormal);
  expect_spec(specs, "final_norm.weight", -1, false, InitRole::kOnes);
  expect_spec(specs, "final_norm.bias", -1, false, InitRole::kZeros);
  for (const std::string block : {"blocks.0.", "blocks.1."}) {
    for (const char* column : {"attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up"})
      expect_spec(specs, block + column + ".weight", 0, false, InitRole::kNormal);
    expect_spec(specs, block + "attn.wo.weight", 1, false, InitRole::kOutputNormal);
    expect_spec(specs, block + "mlp.w_down.weight", 1, false, InitRole::kOutputNormal);
    expect_spec(specs, block + "attn.q_norm.weight", -1, true, InitRole::kOnes);
    expect_spec(specs, block + "attn.k_norm.weight", -1, true, InitRole::kOnes);
    expect_spec(specs, block + "attn_norm.bias", -1, false, InitRole::kZeros);
    expect_spec(specs, block + "mlp_norm.weight", -1, false, InitRole::kOnes);
  }
  // shard_specs is the same walk, in named_parameters() order.
  const auto shards = keel::model::shard_specs(*model);
  const auto params = model->named_parameters();
  ASSERT_EQ(shards.size(), params.size());
  for (size_t i = 0; i < shards.size(); ++i) EXPECT_EQ(shards[i].first, params[i].key());
}

TEST(ModelSharding, InitFollowsTheDeclaredRoles) {
  keel::ModelConfig c = keel::testing::small_model_config(8);
  c.norm = keel::NormKind::kLayerNorm;
  c.layers = 8;  // out_std = init_std / 4
  Llama model(c);
  model->init_weights(3);
  auto params = model->named_parameters();
  EXPECT_TRUE(torch::equal(params["final_norm.weight"], torch::ones({c.d_model})));
  EXPECT_TRUE(torch::equal(params["blocks.0.attn_norm.bias"], torch::zeros({c.d_model})));
  const double wq_std = params["blocks.0.attn.wq.weight"].std().item<double>();
  const double wo_std = params["blocks.0.attn.wo.weight"].std().item<double>();
  EXPECT_NEAR(wq_std, c.init_std, 0.2 * c.init_std);
  EXPECT_NEAR(wo_std, c.init_std / 4.0, 0.2 * c.init_std / 4.0);
}

TEST(ModelSharding, UndeclaredParametersAreReportedAndRefusedByInit) {
  // A plain LibTorch layer nested inside: replicated, kUndeclared, named by its full path.
  torch::nn::Sequential plain(torch::nn::Linear(3, 2));
  const auto plain_specs = specs_of(*plain);
  ASSERT_EQ(plain_specs.count("0.weight"), 1u);
  EXPECT_EQ(plain_specs.at("0.weight").init, InitRole::kUndeclared);
  EXPECT_FALSE(plain_specs.at("0.weight").shard.sharded());

  Undeclared undeclared;
  EXPECT_NE(keel::testing::error_of([&] { undeclared.parameter_spec("w"); }).find("'w'"), std::string::npos);

  Llama model(keel::testing::small_model_config(8));
  model->register_parameter("stray", torch::zeros({2}));
  const std::string error = keel::testing::error_of([&] { model->init_weights(1); });
  EXPECT_NE(error.find("parameter stray was registered without an InitRole"), std::string::npos) << error;
}

// Why: μP (model.parametrization = mup) must be exactly the standard model at its base width (every factor 1, so a
// run tuned there is unchanged), and away from it must scale exactly what μP scales: hidden-matrix init by
// 1/sqrt(m) and LR by 1/m, output logits by 1/m and attention logits by sqrt(D0)/D. The scaled forward is checked
// against the standard model with the factors folded into its weights (wq by sqrt(D0/D), the head by 1/m), which
// is the same function written another way.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <mutex>

#include "core/config/config.h"
#include "core/model/llama.h"
#include "core/model/parametrization.h"
#include "core/model/sharding.h"
#include "tests/unit/parallel_ranks.h"
#include "tests/unit/test_support.h"

namespace keel::model {
namespace {

ModelConfig mup_config(int64_t base) {
  ModelConfig c = keel::testing::small_model_config(/*seq_len=*/12);  // d_model 32, 4 heads
  c.parametrization = Parametrization::kMup;
  c.mup_base_d_model = base;
  return c;
}

torch::Tensor window_of(const ModelConfig& c) {
  auto generator = at::detail::createCPUGenerator(11);
  return at::randint(0, c.vocab, {2, c.seq_len + 1}, generator);  // [B, T+1]
}

TEST(Mup, AtTheBaseWidthItIsTheStandardModelBitForBit) {
  ModelConfig standard = keel::testing::small_model_config(12);
  for (const int64_t base : {int64_t{0}, standard.d_model}) {
    Llama a(standard), b(mup_config(base));
    a->init_weights(5);
    b->init_weights(5);
    const torch::Tensor window = window_of(standard);
    auto la = a->loss(window, torch::kFloat), lb = b->loss(window, torch::kFloat);
    la.loss.backward();
    lb.loss.backward();
    EXPECT_TRUE(torch::equal(la.loss, lb.loss)) << "base " << base;
    auto pa = a->named_parameters(), pb = b->named_parameters();
    for (const auto& item : pa) {
      EXPECT_TRUE(torch::equal(item.value(), *pb.find(item.key()))) << item.key();
      EXPECT_TRUE(torch::equal(item.value().grad(), pb.find(item.key())->grad())) << item.key();
      EXPECT_EQ(mup_lr_scale(mup_config(base), item.key(), item.value().dim()), 1.0) << item.key();
    }
  }
}

TEST(Mup, FactorsFollowTheWidthRatio) {
  const ModelConfig c = mup_config(/*base=*/8);  // m = 32 / 8 = 4; D = 8, D0 = 2
  EXPECT_EQ(mup_width_ratio(c), 4.0);
  EXPECT_EQ(mup_lr_scale(c, "blocks.1.attn.wq.weight", 2), 0.25);
  EXPECT_EQ(mup_lr_scale(c, "blocks.0.mlp.w_down.weight", 2), 0.25);
  EXPECT_EQ(mup_lr_scale(c, "blocks.0.attn_norm.weight", 1), 1.0);
  EXPECT_EQ(mup_lr_scale(c, "embed.weight", 2), 1.0);
  EXPECT_EQ(mup_lr_scale(c, "head.weight", 2), 1.0);
  EXPECT_EQ(mup_init_scale(c, "blocks.0.attn.wk.weight", 2), 0.5);
  EXPECT_EQ(mup_output_multiplier(c), 0.25);
  EXPECT_DOUBLE_EQ(mup_query_multiplier(c), std::sqrt(2.0 / 8.0));
  ModelConfig standard = c;
  standard.parametrization = Parametrization::kStandard;
  standard.mup_base_d_model = 0;
  EXPECT_EQ(mup_width_ratio(standard), 1.0);
  EXPECT_EQ(mup_lr_scale(standard, "blocks.1.attn.wq.weight", 2), 1.0);
}

TEST(Mup, InitScalesHiddenMatricesOnly) {
  ModelConfig standard = keel::testing::small_model_config(12);
  Llama a(standard), b(mup_config(/*base=*/8));
  a->init_weights(5);
  b->init_weights(5);
  auto pb = b->named_parameters();
  for (const auto& item : a->named_parameters()) {
    const double factor = is_hidden_matrix(item.key(), item.value().dim()) ? 0.5 : 1.0;  // 1 / sqrt(4)
    EXPECT_TRUE(torch::allclose(item.value() * factor, *pb.find(item.key()), 0, 1e-7)) << item.key();
  }
}

TEST(Mup, ForwardEqualsTheStandardModelWithTheFactorsFoldedIntoItsWeights) {
  ModelConfig standard = keel::testing::small_model_config(12);
  const ModelConfig mup = mup_config(/*base=*/8);
  Llama a(standard), b(mup);
  b->init_weights(5);
  {
    torch::NoGradGuard no_grad;
    auto pa = a->named_parameters();
    for (const auto& item : b->named_parameters()) {
      torch::Tensor value = item.value().clone();
      if (item.key().find(".attn.wq.") != std::string::npos) value *= mup_query_multiplier(mup);
      if (item.key() == "head.weight") value *= mup_output_multiplier(mup);
      pa.find(item.key())->copy_(value);
    }
  }
  const torch::Tensor tokens = window_of(standard).narrow(1, 0, standard.seq_len);  // [B, T]
  const torch::Tensor la = a->forward(tokens, torch::kFloat), lb = b->forward(tokens, torch::kFloat);
  EXPECT_TRUE(torch::allclose(la, lb, 1e-5, 1e-6)) << (la - lb).abs().max().item<double>();
  const torch::Tensor window = window_of(standard);
  EXPECT_NEAR(a->loss(window, torch::kFloat).loss.item<double>(), b->loss(window, torch::kFloat).loss.item<double>(),
              1e-5);
}

// Under tensor parallelism every rank's shard is the slice of the single-process μP weights (init scaled before
// the split), its LR scale is the unsharded name's, and the tp=2 loss and gradients equal the single process's.
TEST(Mup, TensorParallelShardsAndLossEqualTheSingleProcess) {
  const ModelConfig c = mup_config(/*base=*/8);
  Llama whole(c);
  whole->init_weights(5);
  const torch::Tensor window = window_of(c);
  auto whole_loss = whole->loss(window, torch::kFloat);
  whole_loss.loss.backward();
  const auto whole_params = whole->named_parameters();
  std::mutex mutex;
  std::map<int64_t, std::string> failures;
  keel::testing::run_ranks(1, 2, 1, [&](parallel::ProcessGroups& g) {
    parallel::TensorParallel tp{g.coords.tp, 2, g.tp};
    Llama rank_model(c, tp, StageSpec{0, c.layers, true, true});
    rank_model->init_weights(5);
    auto parts = rank_model->loss(window, torch::kFloat);
    parts.loss.backward();
    std::string failure;
    if (!torch::allclose(parts.loss, whole_loss.loss, 1e-5, 1e-6)) failure += " loss differs;";
    const auto specs = shard_specs(*rank_model);
    size_t index = 0;
    for (const auto& item : rank_model->named_parameters()) {
      const ShardSpec& spec = specs.at(index++).second;
      const torch::Tensor& full = *whole_params.find(item.key());
      if (!torch::equal(item.value(), shard_of(full, spec, tp.rank, tp.size))) failure += " " + item.key() + " init;";
      // A replicated tensor whose gradient is a partial sum over TP is reduced by the trainer, not here.
      if (!spec.grad_partial_over_tp &&
          !torch::allclose(item.value().grad(), shard_of(full.grad(), spec, tp.rank, tp.size), 1e-4, 1e-6))
        failure += " " + item.key() + " grad;";
      if (mup_lr_scale(c, item.key(), item.value().dim()) != mup_lr_scale(c, item.key(), full.dim()))
        failure += " " + item.key() + " lr_scale;";
    }
    std::lock_guard<std::mutex> lock(mutex);
    failures[g.coords.tp] = failure;
  });
  for (const auto& [rank, failure] : failures) EXPECT_EQ(failure, "") << "tp rank " << rank;
}

TEST(Mup, ConfigKeysAreValidatedAndWrittenOnlyWhenSet) {
  Config c;
  EXPECT_EQ(to_ini(c).find("parametrization"), std::string::npos) << "a default key is not written";
  apply_override(c, "model.parametrization=mup");
  apply_override(c, "model.mup_base_d_model=32");
  validate(c);
  const std::string ini = to_ini(c);
  EXPECT_NE(ini.find("parametrization = mup"), std::string::npos) << ini;
  EXPECT_NE(ini.find("mup_base_d_model = 32"), std::string::npos) << ini;
  const Config back = parse_config_text(ini, "config.ini");
  EXPECT_EQ(back.model.parametrization, Parametrization::kMup);
  EXPECT_EQ(back.model.mup_base_d_model, 32);

  const auto error_of = [](const std::vector<std::string>& overrides) -> std::string {
    try {
      Config bad;
      for (const auto& o : overrides) apply_override(bad, o);
      validate(bad);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "(accepted)";
  };
  EXPECT_NE(error_of({"model.mup_base_d_model=32"}).find("model.parametrization is standard"), std::string::npos);
  EXPECT_NE(error_of({"model.parametrization=mup", "model.mup_base_d_model=30"}).find("divisible by model.heads"),
            std::string::npos);
  EXPECT_NE(error_of({"model.parametrization=mup", "model.mup_base_d_model=-4"}).find("model.mup_base_d_model"),
            std::string::npos);
  EXPECT_NE(error_of({"model.parametrization=wide"}).find("model.parametrization"), std::string::npos);
}

}  // namespace
}  // namespace keel::model

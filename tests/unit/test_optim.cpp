// Why: Keel's AdamW plugin must be torch.optim.AdamW's update exactly (checkpoints and plugins rely on its named
// state), the schedule must hit its anchors, and clipping must bound the global norm.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/optim/schedule.h"
#include "core/plugin_host/plugin_library.h"

using namespace keel::optim;
namespace sdk = keel::sdk;

namespace {

// The built-in adamw plugin (the default optimizer), loaded the way the trainer loads it.
std::shared_ptr<sdk::Plugin> adamw(const sdk::Args& args) {
  using keel::plugin_host::PluginLibrary;
  return PluginLibrary::load(keel::plugin_host::resolve_plugin_path("adamw"))->create(args);
}

sdk::StepContext at_lr(double lr) {
  sdk::StepContext ctx;
  ctx.lr = lr;
  return ctx;
}

}  // namespace

TEST(Optim, AdamWPluginMatchesLibTorchAdamW) {
  torch::manual_seed(0);
  torch::Tensor ours = torch::randn({5, 3}).requires_grad_(true);
  torch::Tensor theirs = ours.detach().clone().requires_grad_(true);
  auto optimizer = adamw({{"beta1", "0.9"}, {"beta2", "0.95"}, {"eps", "1e-8"}, {"weight_decay", "0.1"}});
  optimizer->bind({{"w", ours, true}});
  torch::optim::AdamW reference({theirs},
                                torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1));
  for (int i = 0; i < 5; ++i) {
    torch::Tensor g = torch::randn({5, 3});
    ours.mutable_grad() = g.clone();
    theirs.mutable_grad() = g.clone();
    {
      torch::NoGradGuard no_grad;  // as the trainer calls optimizer plugins
      optimizer->step(at_lr(1e-2));
    }
    reference.step();
  }
  EXPECT_TRUE(torch::allclose(ours, theirs, 1e-6, 1e-7));
  const sdk::PluginState state = optimizer->save_state();
  EXPECT_EQ(sdk::json_int(state.json, "step", -1), 5);
  ASSERT_EQ(state.tensors.size(), 2u);
  EXPECT_EQ(state.tensors[0].first, "w/exp_avg");
  EXPECT_EQ(state.tensors[1].first, "w/exp_avg_sq");
}

TEST(Optim, AdamWPluginTakesDefaultsFromTheConfigAndRefusesUnknownArgs) {
  torch::Tensor w = torch::ones({4}).requires_grad_(true);
  auto optimizer = adamw({{"optim.weight_decay", "0.5"}});
  optimizer->bind({{"norm.weight", w, false}});
  w.mutable_grad() = torch::zeros({4});
  torch::NoGradGuard no_grad;
  optimizer->step(at_lr(0.1));
  EXPECT_TRUE(torch::equal(w, torch::ones({4}))) << "no-decay params are not decayed";
  try {
    adamw({{"betaa1", "0.9"}});
    FAIL() << "unknown argument accepted";
  } catch (const keel::plugin_host::PluginError& e) {
    EXPECT_NE(std::string(e.what()).find("'betaa1'"), std::string::npos) << e.what();
  }
}

TEST(Optim, AdamWPluginStateRoundTripsByName) {
  torch::Tensor w = torch::randn({3}).requires_grad_(true);
  auto a = adamw({});
  a->bind({{"w", w, true}});
  torch::NoGradGuard no_grad;
  w.mutable_grad() = torch::randn({3});
  a->step(at_lr(1e-3));
  torch::Tensor w2 = w.detach().clone().requires_grad_(true);
  auto b = adamw({});
  b->bind({{"w", w2, true}});
  b->load_state(a->save_state());
  torch::Tensor g = torch::randn({3});
  w.mutable_grad() = g.clone();
  w2.mutable_grad() = g.clone();
  a->step(at_lr(1e-3));
  b->step(at_lr(1e-3));
  EXPECT_TRUE(torch::equal(w, w2));
  EXPECT_THROW(b->load_state({}), std::runtime_error);
}

TEST(Optim, WarmupCosineAnchors) {
  // Amber: 3e-4 peak, 3e-5 floor, 2000 warm-up steps.
  EXPECT_NEAR(warmup_cosine_lr(0, 3e-4, 3e-5, 2000, 10000), 3e-4 / 2000, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(1999, 3e-4, 3e-5, 2000, 10000), 3e-4, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(2000, 3e-4, 3e-5, 2000, 10000), 3e-4, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(6000, 3e-4, 3e-5, 2000, 10000), (3e-4 + 3e-5) / 2, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(10000, 3e-4, 3e-5, 2000, 10000), 3e-5, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(20000, 3e-4, 3e-5, 2000, 10000), 3e-5, 1e-12);
}

TEST(Optim, ClippingBoundsTheGlobalNorm) {
  torch::Tensor a = torch::zeros({2}).requires_grad_(true), b = torch::zeros({2}).requires_grad_(true);
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({0.0f, 4.0f});
  std::vector<NamedParameter> params{{"a", a, true}, {"b", b, true}};
  torch::Tensor norms = per_tensor_grad_norms(params);
  EXPECT_TRUE(torch::allclose(norms, torch::tensor({3.0f, 4.0f})));
  const double total = global_norm(norms).item<double>();
  EXPECT_NEAR(total, 5.0, 1e-9);
  const double factor = clip_grads_by_global_norm(params, total, 1.0);
  EXPECT_NEAR(factor, 1.0 / 5.0, 1e-6);
  EXPECT_NEAR(global_norm(per_tensor_grad_norms(params)).item<double>(), 1.0, 1e-5);
  EXPECT_EQ(clip_grads_by_global_norm(params, 0.5, 1.0), 1.0);
}

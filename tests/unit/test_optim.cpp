// Why: Keel's AdamW must be torch.optim.AdamW's update exactly (checkpoints and plugins rely on its named
// state), the schedule must hit its anchors, and clipping must bound the global norm.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/optim/adamw.h"

using namespace keel::optim;

TEST(Optim, AdamWMatchesLibTorchAdamW) {
  torch::manual_seed(0);
  torch::Tensor ours = torch::randn({5, 3}).requires_grad_(true);
  torch::Tensor theirs = ours.detach().clone().requires_grad_(true);
  AdamW optimizer({{"w", ours, true}}, AdamWOptions{0.9, 0.95, 1e-8, 0.1});
  torch::optim::AdamW reference({theirs}, torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1));
  for (int i = 0; i < 5; ++i) {
    torch::Tensor g = torch::randn({5, 3});
    ours.mutable_grad() = g.clone();
    theirs.mutable_grad() = g.clone();
    optimizer.step(1e-2);
    reference.step();
  }
  EXPECT_TRUE(torch::allclose(ours, theirs, 1e-6, 1e-7));
  EXPECT_EQ(optimizer.step_count(), 5);
  auto state = optimizer.state_tensors();
  ASSERT_EQ(state.size(), 2u);
  EXPECT_EQ(state[0].first, "w/exp_avg");
  EXPECT_EQ(state[1].first, "w/exp_avg_sq");
}

TEST(Optim, NoDecayParamsAreNotDecayed) {
  torch::Tensor w = torch::ones({4}).requires_grad_(true);
  AdamW optimizer({{"norm.weight", w, false}}, AdamWOptions{0.9, 0.95, 1e-8, 0.5});
  w.mutable_grad() = torch::zeros({4});
  optimizer.step(0.1);
  EXPECT_TRUE(torch::equal(w, torch::ones({4})));
}

TEST(Optim, StateRoundTripsByName) {
  torch::Tensor w = torch::randn({3}).requires_grad_(true);
  AdamW a({{"w", w, true}}, {});
  w.mutable_grad() = torch::randn({3});
  a.step(1e-3);
  torch::Tensor w2 = w.detach().clone().requires_grad_(true);
  AdamW b({{"w", w2, true}}, {});
  b.load_state_tensors(a.state_tensors(), a.step_count());
  torch::Tensor g = torch::randn({3});
  w.mutable_grad() = g.clone();
  w2.mutable_grad() = g.clone();
  a.step(1e-3);
  b.step(1e-3);
  EXPECT_TRUE(torch::equal(w, w2));
  EXPECT_THROW(b.load_state_tensors({}, 1), c10::Error);
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

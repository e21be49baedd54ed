// Why: an optimizer plugin moves the weights of every step, so its arithmetic is checked against a reference
// written out by hand in double precision (the formulas of the papers / torch.optim.AdamW), over two steps so
// that the moments matter; and the AdamW -> Lion swap is checked to carry the momentum over exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

constexpr double kLr = 0.01;

// Two params: a decayed matrix-like one and a norm-like one without decay; two steps of gradients each.
struct Problem {
  std::vector<std::vector<float>> values = {{1.0f, -2.0f, 0.5f, 3.0f}, {0.25f, -0.75f}};
  std::vector<bool> decay = {true, false};
  std::vector<std::vector<std::vector<float>>> grads = {
      {{0.1f, -0.2f, 0.0f, 0.3f}, {0.5f, -0.5f}},      // step 1
      {{-0.05f, -0.1f, 0.2f, -0.01f}, {-0.3f, 0.05f}}  // step 2: grads[.][3] < 0 but Lion's momentum stays > 0
  };
  std::vector<std::string> names = {"blocks.0.mlp.w_up.weight", "blocks.0.attn_norm.weight"};

  std::vector<sdk::Param> params() const {
    std::vector<sdk::Param> out;
    for (size_t i = 0; i < values.size(); ++i) {
      out.push_back(
          make_param(names[i], floats(values[i]), at::zeros({static_cast<int64_t>(values[i].size())}), decay[i]));
    }
    return out;
  }
};

// Sets step `s`'s gradients and runs one optimizer step, under no-grad as Keel does.
void run_step(sdk::Plugin& optimizer, std::vector<sdk::Param>& params, const Problem& problem, size_t s) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) params[i].param.mutable_grad().copy_(floats(problem.grads[s][i]));
  sdk::StepContext ctx;
  ctx.step = static_cast<int64_t>(s);
  ctx.lr = kLr;
  optimizer.step(ctx);
}

void expect_values(const sdk::Param& param, const std::vector<double>& expected, double tolerance) {
  const at::Tensor actual = param.param.detach().to(at::kDouble).contiguous();  // [n]
  ASSERT_EQ(actual.numel(), static_cast<int64_t>(expected.size())) << param.name;
  for (size_t j = 0; j < expected.size(); ++j) {
    EXPECT_NEAR(actual.data_ptr<double>()[j], expected[j], tolerance) << param.name << "[" << j << "]";
  }
}

const at::Tensor& state_tensor(const sdk::PluginState& state, const std::string& name) {
  for (const auto& [n, t] : state.tensors) {
    if (n == name) return t;
  }
  throw std::runtime_error("no state tensor " + name);
}

double sign(double x) { return x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0; }

TEST(Lion, TwoStepsMatchAHandComputedReference) {
  const double beta1 = 0.9, beta2 = 0.99, wd = 0.1;
  Problem problem;
  auto lion = make_plugin("lion", {{"beta1", "0.9"}, {"beta2", "0.99"}, {"weight_decay", "0.1"}});
  std::vector<sdk::Param> params = problem.params();
  lion->bind(params);
  for (size_t s = 0; s < 2; ++s) run_step(*lion, params, problem, s);

  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<double> p(problem.values[i].begin(), problem.values[i].end()), m(p.size(), 0.0);
    for (size_t s = 0; s < 2; ++s) {
      for (size_t j = 0; j < p.size(); ++j) {
        const double g = problem.grads[s][i][j];
        const double update = sign(beta1 * m[j] + (1 - beta1) * g);
        if (problem.decay[i]) p[j] *= 1 - kLr * wd;
        p[j] -= kLr * update;
        m[j] = beta2 * m[j] + (1 - beta2) * g;
      }
    }
    expect_values(params[i], p, 1e-6);
    const at::Tensor momentum = state_tensor(lion->save_state(), problem.names[i] + "/exp_avg").to(at::kDouble);
    for (size_t j = 0; j < m.size(); ++j) EXPECT_NEAR(momentum[j].item<double>(), m[j], 1e-7);
  }
  // Coordinate 3 of the first param: its step-2 gradient is negative, yet the momentum term wins the sign.
  EXPECT_NEAR(params[0].param[3].item<double>(), (3.0 * (1 - kLr * wd) - kLr) * (1 - kLr * wd) - kLr, 1e-6);
}

TEST(Lion, WeightDecayDefaultsToTheRunsOptimWeightDecay) {
  Problem problem;
  auto lion = make_plugin("lion", {{"optim.weight_decay", "0.5"}});
  std::vector<sdk::Param> params = problem.params();
  lion->bind(params);
  run_step(*lion, params, problem, 0);
  // Step 1: update = sign(g); p = p * (1 - lr * 0.5) - lr * sign(g).
  expect_values(
      params[0],
      {1.0 * (1 - kLr * 0.5) - kLr, -2.0 * (1 - kLr * 0.5) + kLr, 0.5 * (1 - kLr * 0.5), 3.0 * (1 - kLr * 0.5) - kLr},
      1e-6);
}

TEST(Lion, StateRoundTripsIntoAFreshObject) {
  Problem problem;
  auto first = make_plugin("lion");
  std::vector<sdk::Param> a = problem.params();
  first->bind(a);
  run_step(*first, a, problem, 0);

  auto second = make_plugin("lion");
  std::vector<sdk::Param> b = problem.params();
  for (size_t i = 0; i < b.size(); ++i) b[i].param.detach().copy_(a[i].param.detach());
  second->bind(b);
  second->load_state(first->save_state());
  run_step(*first, a, problem, 1);
  run_step(*second, b, problem, 1);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].param, b[i].param)) << a[i].name;
}

TEST(Lion, RefusesBadArguments) {
  EXPECT_NE(refusal_of("lion", {{"beta1", "1"}}).find("'beta1'"), std::string::npos);
  EXPECT_NE(refusal_of("lion", {{"beta2", "-0.1"}}).find("'beta2'"), std::string::npos);
  EXPECT_NE(refusal_of("lion", {{"weight_decay", "-1"}}).find("'weight_decay'"), std::string::npos);
  EXPECT_NE(refusal_of("lion", {{"beta1", "abc"}}).find("'beta1'"), std::string::npos);
}

TEST(AdamW, TwoStepsMatchAHandComputedTorchOptimAdamWStep) {
  const double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
  Problem problem;
  auto adamw = make_plugin("adamw", {{"beta1", "0.9"}, {"beta2", "0.95"}, {"eps", "1e-8"}, {"weight_decay", "0.1"}});
  std::vector<sdk::Param> params = problem.params();
  adamw->bind(params);
  for (size_t s = 0; s < 2; ++s) run_step(*adamw, params, problem, s);

  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<double> p(problem.values[i].begin(), problem.values[i].end()), m(p.size(), 0.0), v(p.size(), 0.0);
    for (size_t s = 0; s < 2; ++s) {
      const double t = static_cast<double>(s + 1);
      for (size_t j = 0; j < p.size(); ++j) {
        const double g = problem.grads[s][i][j];
        if (problem.decay[i]) p[j] *= 1 - kLr * wd;
        m[j] = beta1 * m[j] + (1 - beta1) * g;
        v[j] = beta2 * v[j] + (1 - beta2) * g * g;
        const double m_hat = m[j] / (1 - std::pow(beta1, t));
        const double denom = std::sqrt(v[j]) / std::sqrt(1 - std::pow(beta2, t)) + eps;
        p[j] -= kLr * m_hat / denom;
      }
    }
    expect_values(params[i], p, 1e-6);
  }
}

TEST(AdamWToLion, AdoptStateTakesExpAvgExactlyAndSaysExpAvgSqIsUnused) {
  Problem problem;
  auto adamw = make_plugin("adamw");
  std::vector<sdk::Param> params = problem.params();
  adamw->bind(params);
  for (size_t s = 0; s < 2; ++s) run_step(*adamw, params, problem, s);
  const sdk::PluginState adamw_state = adamw->save_state();

  auto lion = make_plugin("lion");
  std::vector<sdk::Param> lion_params = problem.params();
  lion->bind(lion_params);
  const std::vector<std::string> lines = lion->adopt_state(adamw_state.tensors);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_NE(lines[0].find("adopted exp_avg of 2/2 tensors"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("exp_avg_sq is not used"), std::string::npos) << lines[1];

  const sdk::PluginState lion_state = lion->save_state();
  for (const auto& name : problem.names) {
    const at::Tensor& adopted = state_tensor(lion_state, name + "/exp_avg");
    EXPECT_TRUE(at::equal(adopted, state_tensor(adamw_state, name + "/exp_avg"))) << name;
    EXPECT_FALSE(at::equal(adopted, at::zeros_like(adopted))) << name;
  }
  for (const auto& [name, tensor] : lion_state.tensors) {
    EXPECT_EQ(name.find("exp_avg_sq"), std::string::npos) << name;
  }
}

TEST(AdamWToLion, AMisshapenOrMissingMomentumStartsAtZero) {
  Problem problem;
  auto lion = make_plugin("lion");
  std::vector<sdk::Param> params = problem.params();
  lion->bind(params);
  const sdk::NamedTensors previous = {{problem.names[0] + "/exp_avg", at::ones({4})},
                                      {problem.names[1] + "/exp_avg", at::ones({3})}};  // wrong shape
  const std::vector<std::string> lines = lion->adopt_state(previous);
  EXPECT_NE(lines.at(0).find("adopted exp_avg of 1/2 tensors"), std::string::npos) << lines[0];
  const sdk::PluginState state = lion->save_state();
  EXPECT_TRUE(at::equal(state_tensor(state, problem.names[0] + "/exp_avg"), at::ones({4})));
  EXPECT_TRUE(at::equal(state_tensor(state, problem.names[1] + "/exp_avg"), at::zeros({2})));
}

// sdk::Param::lr_scale (μP's per-layer LR): a param with lr_scale 0.5 takes exactly the steps it would take at half
// the LR, and the others are untouched by it; with every scale at 1 nothing changes.
TEST(LrScale, EachParamStepsWithItsOwnMultipleOfTheLrInEveryBuiltInOptimizer) {
  for (const std::string name : {"adamw", "lion"}) {
    Problem problem;
    std::vector<sdk::Param> scaled = problem.params(), half = problem.params(), full = problem.params();
    scaled[0].lr_scale = 0.5;
    auto a = make_plugin(name), b = make_plugin(name), c = make_plugin(name);
    a->bind(scaled);
    b->bind(half);
    c->bind(full);
    for (size_t s = 0; s < 2; ++s) {
      run_step(*a, scaled, problem, s);
      run_step(*c, full, problem, s);
      at::NoGradGuard no_grad;  // `half`: every param at lr * 0.5
      for (size_t i = 0; i < half.size(); ++i) half[i].param.mutable_grad().copy_(floats(problem.grads[s][i]));
      sdk::StepContext ctx;
      ctx.step = static_cast<int64_t>(s);
      ctx.lr = kLr * 0.5;
      b->step(ctx);
    }
    EXPECT_TRUE(at::equal(scaled[0].param, half[0].param)) << name << ": the scaled param steps at lr * 0.5";
    EXPECT_TRUE(at::equal(scaled[1].param, full[1].param)) << name << ": the unscaled param steps at lr";
    EXPECT_FALSE(at::equal(scaled[0].param, full[0].param)) << name;
  }
}

}  // namespace
}  // namespace keel::testing

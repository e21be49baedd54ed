// Why: muon moves the hidden matrices by an orthogonalised momentum and everything else by AdamW, so each part is
// pinned separately: the matrices against the written-out Muon update in double precision, the rest bitwise
// against the adamw plugin itself; the update is (nearly) orthogonal; which params count as hidden matrices; the
// state round-trips into a fresh object bit-exactly and is adopted from AdamW by name; bad arguments are refused
// naming the key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

constexpr double kLr = 0.01;

// A hidden matrix [3, 5], a norm weight [4] (no decay) and the embedding [6, 2] (excluded by default).
struct Model {
  std::vector<std::string> names = {"blocks.0.mlp.w_up.weight", "blocks.0.attn_norm.weight", "embed.weight"};
  std::vector<std::vector<int64_t>> shapes = {{3, 5}, {4}, {6, 2}};
  std::vector<bool> decay = {true, false, true};

  std::vector<sdk::Param> params(uint64_t seed = 3) const {
    at::manual_seed(seed);
    std::vector<sdk::Param> out;
    for (size_t i = 0; i < names.size(); ++i)
      out.push_back(make_param(names[i], at::randn(shapes[i]), at::zeros(shapes[i]), decay[i]));
    return out;
  }
  // Step s's gradients, the same for every copy of the params.
  std::vector<at::Tensor> grads(int64_t s) const {
    at::manual_seed(100 + static_cast<uint64_t>(s));
    std::vector<at::Tensor> out;
    for (const auto& shape : shapes) out.push_back(at::randn(shape));
    return out;
  }
};

void run_step(sdk::Plugin& optimizer, std::vector<sdk::Param>& params, const Model& model, int64_t s, double lr = kLr) {
  at::NoGradGuard no_grad;
  const std::vector<at::Tensor> grads = model.grads(s);
  for (size_t i = 0; i < params.size(); ++i) params[i].param.mutable_grad().copy_(grads[i]);
  sdk::StepContext ctx;
  ctx.step = s;
  ctx.lr = lr;
  optimizer.step(ctx);
}

const at::Tensor& state_tensor(const sdk::PluginState& state, const std::string& name) {
  for (const auto& [n, t] : state.tensors) {
    if (n == name) return t;
  }
  throw std::runtime_error("no state tensor " + name);
}
bool has_state_tensor(const sdk::PluginState& state, const std::string& name) {
  for (const auto& [n, t] : state.tensors) {
    if (n == name) return true;
  }
  return false;
}

// The Muon update of the reference in float64: NewtonSchulz5 of a [r, c] matrix.
at::Tensor newton_schulz_reference(at::Tensor g, int64_t steps) {
  const bool tall = g.size(0) > g.size(1);
  at::Tensor x = tall ? g.t() : g;
  x = x / (x.norm() + 1e-7);
  for (int64_t i = 0; i < steps; ++i) {
    at::Tensor a = x.mm(x.t());
    at::Tensor b = -4.7750 * a + 2.0315 * a.mm(a);
    x = 3.4445 * x + b.mm(x);
  }
  return tall ? x.t() : x;
}

TEST(Muon, HiddenMatricesFollowTheMuonUpdateWrittenOutInDoublePrecision) {
  const double momentum = 0.95, wd = 0.1;
  Model model;
  auto muon = make_plugin("muon", {{"weight_decay", "0.1"}});
  std::vector<sdk::Param> params = model.params();
  const at::Tensor start = params[0].param.detach().to(at::kDouble).clone();  // [3, 5]
  muon->bind(params);
  for (int64_t s = 0; s < 2; ++s) run_step(*muon, params, model, s);

  at::Tensor w = start.clone(), m = at::zeros_like(start);
  for (int64_t s = 0; s < 2; ++s) {
    const at::Tensor g = model.grads(s)[0].to(at::kDouble);
    w = w * (1 - kLr * wd);
    m = momentum * m + (1 - momentum) * g;
    const at::Tensor u = (1 - momentum) * g + momentum * m;  // Nesterov: lerp(g, m, momentum)
    w = w - kLr * 0.2 * std::sqrt(5.0) * newton_schulz_reference(u, 5);
  }
  const double error = (params[0].param.detach().to(at::kDouble) - w).abs().max().item<double>();
  EXPECT_LT(error, 1e-5) << "max |muon - reference| over the matrix";
  const at::Tensor saved_m = state_tensor(muon->save_state(), model.names[0] + "/exp_avg").to(at::kDouble);
  EXPECT_LT((saved_m - m).abs().max().item<double>(), 1e-6);
  EXPECT_FALSE(has_state_tensor(muon->save_state(), model.names[0] + "/exp_avg_sq")) << "a matrix has no exp_avg_sq";
}

TEST(Muon, EverythingElseIsTheAdamWPluginBitForBit) {
  Model model;
  auto muon = make_plugin("muon", {{"beta1", "0.8"}, {"beta2", "0.9"}, {"eps", "1e-6"}, {"weight_decay", "0.2"}});
  auto adamw = make_plugin("adamw", {{"beta1", "0.8"}, {"beta2", "0.9"}, {"eps", "1e-6"}, {"weight_decay", "0.2"}});
  std::vector<sdk::Param> a = model.params(), b = model.params();
  muon->bind(a);
  adamw->bind(b);
  for (int64_t s = 0; s < 3; ++s) {
    run_step(*muon, a, model, s);
    run_step(*adamw, b, model, s);
  }
  for (size_t i : {1, 2}) {
    EXPECT_TRUE(at::equal(a[i].param, b[i].param)) << a[i].name;
    for (const char* kind : {"/exp_avg", "/exp_avg_sq"})
      EXPECT_TRUE(at::equal(state_tensor(muon->save_state(), a[i].name + kind),
                            state_tensor(adamw->save_state(), b[i].name + kind)))
          << a[i].name << kind;
  }
  EXPECT_FALSE(at::equal(a[0].param, b[0].param)) << "the matrix is Muon's, not AdamW's";
  EXPECT_EQ(muon->save_state().json, "{\"step\": 3}");
}

TEST(Muon, TheUpdateOfAMatrixIsNearlyOrthogonal) {
  // momentum 0, no Nesterov, no decay, scale = shape, lr 1: W changes by exactly -NewtonSchulz5(g), whose singular
  // values the quintic iteration brings into roughly [0.7, 1.2] (it trades exactness for speed, by design).
  sdk::Param p = make_param("blocks.0.attn.wq.weight", at::zeros({4, 8}), at::randn({4, 8}));
  auto muon =
      make_plugin("muon", {{"momentum", "0"}, {"nesterov", "false"}, {"weight_decay", "0"}, {"scale", "shape"}});
  std::vector<sdk::Param> params = {p};
  muon->bind(params);
  sdk::StepContext ctx;
  ctx.lr = 1.0;
  {
    at::NoGradGuard no_grad;
    muon->step(ctx);
  }
  const at::Tensor singular = at::linalg_svdvals(params[0].param.detach().to(at::kDouble));  // [4]
  EXPECT_GT(singular.min().item<double>(), 0.6) << singular;
  EXPECT_LT(singular.max().item<double>(), 1.25) << singular;
  // A tall matrix is orthogonalised through its transpose: the same bound, and scale = shape gives sqrt(rows/cols).
  sdk::Param tall = make_param("blocks.0.mlp.w_down.weight", at::zeros({8, 2}), at::randn({8, 2}));
  std::vector<sdk::Param> tall_params = {tall};
  auto muon_tall =
      make_plugin("muon", {{"momentum", "0"}, {"nesterov", "false"}, {"weight_decay", "0"}, {"scale", "shape"}});
  muon_tall->bind(tall_params);
  {
    at::NoGradGuard no_grad;
    muon_tall->step(ctx);
  }
  const at::Tensor tall_singular = at::linalg_svdvals(tall_params[0].param.detach().to(at::kDouble)) / 2.0;
  EXPECT_GT(tall_singular.min().item<double>(), 0.6) << tall_singular;
  EXPECT_LT(tall_singular.max().item<double>(), 1.25) << tall_singular;
}

TEST(Muon, ExcludeDecidesWhichMatricesGoToAdamW) {
  Model model;
  auto muon = make_plugin("muon", {{"exclude", "blocks.*"}});  // now embed.weight is a hidden matrix, w_up is not
  std::vector<sdk::Param> params = model.params();
  muon->bind(params);
  const sdk::PluginState state = muon->save_state();
  EXPECT_TRUE(has_state_tensor(state, "blocks.0.mlp.w_up.weight/exp_avg_sq"));
  EXPECT_FALSE(has_state_tensor(state, "embed.weight/exp_avg_sq"));
  EXPECT_TRUE(has_state_tensor(state, "blocks.0.attn_norm.weight/exp_avg_sq")) << "1-D params are always AdamW's";
}

TEST(Muon, StateRoundTripsIntoAFreshObjectAndContinuesBitExactly) {
  Model model;
  auto first = make_plugin("muon");
  std::vector<sdk::Param> a = model.params();
  first->bind(a);
  for (int64_t s = 0; s < 2; ++s) run_step(*first, a, model, s);

  auto second = make_plugin("muon");
  std::vector<sdk::Param> b = model.params(/*seed=*/99);
  for (size_t i = 0; i < b.size(); ++i) b[i].param.detach().copy_(a[i].param.detach());
  second->bind(b);
  second->load_state(first->save_state());
  for (int64_t s = 2; s < 4; ++s) {
    run_step(*first, a, model, s);
    run_step(*second, b, model, s);
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].param, b[i].param)) << a[i].name;
  const sdk::PluginState sa = first->save_state(), sb = second->save_state();
  EXPECT_EQ(sa.json, sb.json);
  ASSERT_EQ(sa.tensors.size(), sb.tensors.size());
  for (size_t i = 0; i < sa.tensors.size(); ++i)
    EXPECT_TRUE(at::equal(sa.tensors[i].second, sb.tensors[i].second)) << sa.tensors[i].first;
}

TEST(Muon, AdoptsAdamWsMomentsByName) {
  Model model;
  auto adamw = make_plugin("adamw");
  std::vector<sdk::Param> params = model.params();
  adamw->bind(params);
  for (int64_t s = 0; s < 2; ++s) run_step(*adamw, params, model, s);
  const sdk::PluginState previous = adamw->save_state();

  auto muon = make_plugin("muon");
  std::vector<sdk::Param> muon_params = model.params();
  muon->bind(muon_params);
  const std::vector<std::string> lines = muon->adopt_state(previous.tensors);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_NE(lines[0].find("adopted exp_avg of 1/1 hidden matrices as their momentum"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("adopted exp_avg of 2/2 and exp_avg_sq of 2/2 AdamW-updated tensors"), std::string::npos)
      << lines[1];
  const sdk::PluginState adopted = muon->save_state();
  for (const auto& [name, tensor] : adopted.tensors)
    EXPECT_TRUE(at::equal(tensor, state_tensor(previous, name))) << name;
  EXPECT_EQ(adopted.json, "{\"step\": 0}");
}

TEST(Muon, ResetMomentsZeroesEveryMoment) {
  Model model;
  auto muon = make_plugin("muon");
  std::vector<sdk::Param> params = model.params();
  muon->bind(params);
  run_step(*muon, params, model, 0);
  muon->reset_moments();
  for (const auto& [name, tensor] : muon->save_state().tensors)
    EXPECT_TRUE(at::equal(tensor, at::zeros_like(tensor))) << name;
}

TEST(Muon, RefusesBadArgumentsNamingTheKey) {
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{{"momentum", "1"},
                                                                                   {"momentum", "-0.1"},
                                                                                   {"nesterov", "maybe"},
                                                                                   {"ns_steps", "0"},
                                                                                   {"lr_ratio", "0"},
                                                                                   {"scale", "spectral"},
                                                                                   {"beta2", "1"},
                                                                                   {"eps", "0"},
                                                                                   {"weight_decay", "-1"}}) {
    const std::string refusal = refusal_of("muon", {{key, value}});
    EXPECT_NE(refusal.find("muon"), std::string::npos) << key << ": " << refusal;
    EXPECT_NE(refusal.find("'" + key + "'"), std::string::npos) << key << ": " << refusal;
  }
}

}  // namespace
}  // namespace keel::testing

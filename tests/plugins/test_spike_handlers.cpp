// Why: a spike handler decides whether a step's update is applied, so its decisions are pinned down on
// synthetic loss histories whose statistics are exact in binary (losses alternating 2 and 3: mean 2.5, std 0.5;
// grad norms alternating 1 and 1.5: mean 1.25, std 0.25), including what survives a checkpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

using Action = sdk::Decision::Action;

sdk::StepContext steady_step(int64_t step) {
  sdk::StepContext ctx;
  ctx.step = step;
  ctx.loss = step % 2 == 0 ? 2.0 : 3.0;
  ctx.grad_norm = step % 2 == 0 ? 1.0 : 1.5;
  return ctx;
}

sdk::StepContext step_with(int64_t step, double loss, double grad_norm) {
  sdk::StepContext ctx;
  ctx.step = step;
  ctx.loss = loss;
  ctx.grad_norm = grad_norm;
  return ctx;
}

// Feeds steps [0, n) of the steady history; every one must be continued.
void feed_steady(sdk::Plugin& handler, int64_t n) {
  for (int64_t step = 0; step < n; ++step) {
    const sdk::Decision d = handler.decide(steady_step(step));
    ASSERT_EQ(d.action, Action::kContinue) << "step " << step << ": " << d.reason;
  }
}

int64_t window_length(const sdk::PluginState& state, const std::string& name) {
  for (const auto& [n, t] : state.tensors) {
    if (n == name) return t.numel();
  }
  return -1;
}

// ------------------------------------------------------------------------------------------------ zscore_skip

TEST(ZScoreSkip, SkipsExactlyTheSpikeAndContinuesAfter) {
  auto handler = make_plugin("zscore_skip");
  feed_steady(*handler, 30);
  const sdk::Decision spike = handler->decide(step_with(30, 10.0, 1.25));
  EXPECT_EQ(spike.action, Action::kSkipUpdate);
  EXPECT_EQ(spike.reason, "step 30: loss 10 has z-score 15 > 6 (mean 2.5, std 0.5 over the last 30 steps)");
  const sdk::Decision next = handler->decide(step_with(31, 3.0, 1.5));
  EXPECT_EQ(next.action, Action::kContinue) << next.reason;
  // The skipped step did not enter the window; the next one did.
  EXPECT_EQ(window_length(handler->save_state(), "loss_window"), 31);
}

TEST(ZScoreSkip, SkipsAGradNormSpike) {
  auto handler = make_plugin("zscore_skip");
  feed_steady(*handler, 30);
  const sdk::Decision d = handler->decide(step_with(30, 2.5, 100.0));
  EXPECT_EQ(d.action, Action::kSkipUpdate);
  EXPECT_NE(d.reason.find("grad_norm 100 has z-score 395 > 6"), std::string::npos) << d.reason;
}

TEST(ZScoreSkip, DecidesNothingBeforeMinHistoryButAlwaysSkipsNonFinite) {
  auto handler = make_plugin("zscore_skip");
  feed_steady(*handler, 9);  // min_history = 10
  EXPECT_EQ(handler->decide(step_with(9, 1000.0, 1.25)).action, Action::kContinue);
  const sdk::Decision nan_loss = handler->decide(step_with(10, std::nan(""), 1.0));
  EXPECT_EQ(nan_loss.action, Action::kSkipUpdate);
  EXPECT_NE(nan_loss.reason.find("loss is nan (not finite)"), std::string::npos) << nan_loss.reason;
  auto fresh = make_plugin("zscore_skip");
  EXPECT_EQ(fresh->decide(step_with(0, 2.0, std::numeric_limits<double>::infinity())).action, Action::kSkipUpdate);
}

TEST(ZScoreSkip, ThresholdIsStrictAndConfigurable) {
  auto handler = make_plugin("zscore_skip");
  feed_steady(*handler, 30);
  EXPECT_EQ(handler->decide(step_with(30, 5.5, 1.25)).action, Action::kContinue);  // z = 6 exactly
  auto strict = make_plugin("zscore_skip", {{"threshold", "3"}});
  feed_steady(*strict, 30);
  EXPECT_EQ(strict->decide(step_with(30, 4.25, 1.25)).action, Action::kSkipUpdate);  // z = 3.5
}

TEST(ZScoreSkip, WindowKeepsOnlyTheNewestValues) {
  auto handler = make_plugin("zscore_skip", {{"window", "4"}, {"min_history", "4"}});
  feed_steady(*handler, 20);
  EXPECT_EQ(window_length(handler->save_state(), "loss_window"), 4);
  EXPECT_EQ(window_length(handler->save_state(), "grad_norm_window"), 4);
}

TEST(ZScoreSkip, EmitsZScoresAsMetrics) {
  auto handler = make_plugin("zscore_skip");
  feed_steady(*handler, 30);
  std::map<std::string, double> metrics;
  sdk::StepContext ctx = context_recording(metrics);
  ctx.step = 30;
  ctx.loss = 3.5;
  ctx.grad_norm = 1.25;
  handler->decide(ctx);
  EXPECT_DOUBLE_EQ(metrics.at("loss_zscore"), 2.0);
  EXPECT_DOUBLE_EQ(metrics.at("grad_norm_zscore"), 0.0);
}

TEST(ZScoreSkip, SavedWindowGivesAFreshObjectTheSameDecisions) {
  auto original = make_plugin("zscore_skip");
  feed_steady(*original, 30);
  original->decide(step_with(30, 10.0, 1.25));  // skipped: stays out of the saved window
  const sdk::PluginState state = original->save_state();
  EXPECT_NE(state.json.find("\"skipped\": 1"), std::string::npos) << state.json;

  auto restored = make_plugin("zscore_skip");
  restored->load_state(state);
  auto forgetful = make_plugin("zscore_skip");  // no state: no history, so no z-score decision
  const std::vector<std::pair<double, Action>> inputs = {{5.6, Action::kSkipUpdate},  // z = 6.2
                                                         {5.5, Action::kContinue}};   // z = 6, not > 6
  for (const auto& [loss, expected] : inputs) {
    const sdk::Decision a = original->decide(step_with(31, loss, 1.25));
    const sdk::Decision b = restored->decide(step_with(31, loss, 1.25));
    EXPECT_EQ(a.action, expected) << loss;
    EXPECT_EQ(b.action, expected) << loss;
    EXPECT_EQ(a.reason, b.reason) << loss;
    EXPECT_EQ(forgetful->decide(step_with(31, loss, 1.25)).action, Action::kContinue);
  }
  EXPECT_EQ(restored->save_state().json, "{\"skipped\": 2}");
  EXPECT_EQ(window_length(restored->save_state(), "loss_window"), 31);
}

TEST(ZScoreSkip, RefusesBadArgumentsAndBadState) {
  EXPECT_NE(refusal_of("zscore_skip", {{"window", "1"}}).find("'window'"), std::string::npos);
  EXPECT_NE(refusal_of("zscore_skip", {{"min_history", "1"}}).find("'min_history'"), std::string::npos);
  EXPECT_NE(refusal_of("zscore_skip", {{"window", "5"}, {"min_history", "6"}}).find("'min_history'"),
            std::string::npos);
  EXPECT_NE(refusal_of("zscore_skip", {{"threshold", "0"}}).find("'threshold'"), std::string::npos);
  EXPECT_NE(refusal_of("zscore_skip", {{"threshold", "six"}}).find("'threshold'"), std::string::npos);
  auto handler = make_plugin("zscore_skip");
  sdk::PluginState bad;
  bad.tensors.emplace_back("loss_window", at::zeros({2, 2}));
  EXPECT_NE(error_of([&] { handler->load_state(bad); }).find("'loss_window' must be a 1-D"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------ rollback_skip

sdk::StepContext spike_with_batch(int64_t step) {
  sdk::StepContext ctx = step_with(step, 10.0, 1.25);
  ctx.batch = {{"prose", 5, 0, 3}, {"code", 100, 0, 7}, {"prose", 6, 0, 3}, {"prose", 9, 1, 1}, {"code", 101, 0, 7}};
  return ctx;
}

TEST(RollbackSkip, RollsBackSkippingTheBatchsChunks) {
  auto handler = make_plugin("rollback_skip");
  feed_steady(*handler, 30);
  const sdk::Decision d = handler->decide(spike_with_batch(30));
  EXPECT_EQ(d.action, Action::kRollback);
  EXPECT_EQ(d.skip_data, "code:chunk:7;prose:chunk:1;prose:chunk:3");
  EXPECT_FALSE(d.reset_optimizer_moments);
  EXPECT_DOUBLE_EQ(d.lr_factor, 0.5);
  EXPECT_EQ(d.lr_factor_steps, 100);
  EXPECT_NE(d.reason.find("loss 10 has z-score 15"), std::string::npos) << d.reason;
  EXPECT_NE(d.reason.find("rollback 1 of at most 3"), std::string::npos) << d.reason;
}

TEST(RollbackSkip, SamplesModeAndInterventionArguments) {
  auto handler =
      make_plugin("rollback_skip",
                  {{"skip", "samples"}, {"reset_moments", "true"}, {"lr_factor", "0.25"}, {"lr_factor_steps", "20"}});
  feed_steady(*handler, 30);
  const sdk::Decision d = handler->decide(spike_with_batch(30));
  EXPECT_EQ(d.action, Action::kRollback);
  EXPECT_EQ(d.skip_data, "code:samples:100-101;prose:samples:5-6;prose:samples:9");
  EXPECT_TRUE(d.reset_optimizer_moments);
  EXPECT_DOUBLE_EQ(d.lr_factor, 0.25);
  EXPECT_EQ(d.lr_factor_steps, 20);
}

TEST(RollbackSkip, FallsBackToSkipAfterMaxRollbacksAndRemembersTheCount) {
  auto handler = make_plugin("rollback_skip", {{"max_rollbacks", "2"}});
  feed_steady(*handler, 30);
  for (int rollback = 0; rollback < 2; ++rollback) {
    EXPECT_EQ(handler->decide(spike_with_batch(30)).action, Action::kRollback);
    handler->on_rollback(20);
  }
  const sdk::Decision third = handler->decide(spike_with_batch(30));
  EXPECT_EQ(third.action, Action::kSkipUpdate);
  EXPECT_NE(third.reason.find("max_rollbacks = 2 reached"), std::string::npos) << third.reason;
  EXPECT_TRUE(third.skip_data.empty());

  const sdk::PluginState state = handler->save_state();
  EXPECT_EQ(state.json, "{\"rollbacks\": 2, \"last_rollback_to_step\": 20}");
  auto restored = make_plugin("rollback_skip", {{"max_rollbacks", "2"}});
  restored->load_state(state);
  EXPECT_EQ(restored->decide(spike_with_batch(31)).action, Action::kSkipUpdate);
  auto more_allowed = make_plugin("rollback_skip", {{"max_rollbacks", "3"}});
  more_allowed->load_state(state);
  EXPECT_EQ(more_allowed->decide(spike_with_batch(31)).action, Action::kRollback);
}

TEST(RollbackSkip, RefusesBadArguments) {
  EXPECT_NE(refusal_of("rollback_skip", {{"skip", "documents"}}).find("'skip'"), std::string::npos);
  EXPECT_NE(refusal_of("rollback_skip", {{"reset_moments", "maybe"}}).find("'reset_moments'"), std::string::npos);
  EXPECT_NE(refusal_of("rollback_skip", {{"lr_factor", "0"}}).find("'lr_factor'"), std::string::npos);
  EXPECT_NE(refusal_of("rollback_skip", {{"lr_factor_steps", "-1"}}).find("'lr_factor_steps'"), std::string::npos);
  EXPECT_NE(refusal_of("rollback_skip", {{"max_rollbacks", "-1"}}).find("'max_rollbacks'"), std::string::npos);
  EXPECT_NE(refusal_of("rollback_skip", {{"window", "x"}}).find("'window'"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------ lr_cooldown

TEST(LrCooldown, ContinuesWithALowerLrOnASpike) {
  auto handler = make_plugin("lr_cooldown");
  feed_steady(*handler, 30);
  const sdk::Decision d = handler->decide(step_with(30, 10.0, 1.25));
  EXPECT_EQ(d.action, Action::kContinue);
  EXPECT_DOUBLE_EQ(d.lr_factor, 0.3);
  EXPECT_EQ(d.lr_factor_steps, 50);
  EXPECT_NE(d.reason.find("loss 10 has z-score 15"), std::string::npos) << d.reason;
  const sdk::Decision next = handler->decide(step_with(31, 3.0, 1.5));
  EXPECT_EQ(next.action, Action::kContinue);
  EXPECT_DOUBLE_EQ(next.lr_factor, 1.0);
  EXPECT_EQ(next.lr_factor_steps, 0);
  EXPECT_TRUE(next.reason.empty());
  EXPECT_EQ(handler->save_state().json, "{\"cooldowns\": 1}");
}

TEST(LrCooldown, ArgumentsSetTheFactorAndLength) {
  auto handler = make_plugin("lr_cooldown", {{"lr_factor", "0.5"}, {"cooldown_steps", "10"}});
  feed_steady(*handler, 30);
  const sdk::Decision d = handler->decide(step_with(30, 2.5, 100.0));
  EXPECT_EQ(d.action, Action::kContinue);
  EXPECT_DOUBLE_EQ(d.lr_factor, 0.5);
  EXPECT_EQ(d.lr_factor_steps, 10);
  EXPECT_NE(refusal_of("lr_cooldown", {{"lr_factor", "0"}}).find("'lr_factor'"), std::string::npos);
  EXPECT_NE(refusal_of("lr_cooldown", {{"lr_factor", "1.5"}}).find("'lr_factor'"), std::string::npos);
  EXPECT_NE(refusal_of("lr_cooldown", {{"cooldown_steps", "0"}}).find("'cooldown_steps'"), std::string::npos);
}

}  // namespace
}  // namespace keel::testing

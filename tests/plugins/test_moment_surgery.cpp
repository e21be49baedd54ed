// Why: moment_surgery asks Keel to rescale optimizer moments, and the text it returns (Decision::moment_scales)
// is what Keel applies, so the tests pin that text exactly, when it is returned (once at a resume, once at a step,
// at every spike), that the "already fired" memory round-trips through the plugin state (a resumed branch must not
// repeat the surgery), its warm start, and that every bad argument is refused naming the key.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

using Action = sdk::Decision::Action;

sdk::StepContext step_with(int64_t step, double loss) {
  sdk::StepContext ctx;
  ctx.step = step;
  ctx.loss = loss;
  ctx.grad_norm = 1.0 + 0.1 * static_cast<double>(step % 2);
  return ctx;
}

TEST(MomentSurgery, AtResumeFiresOnceAtItsFirstStepWithTheExactText) {
  auto surgery = make_plugin("moment_surgery", {{"pattern", "blocks.*.attn.*, head.weight"}, {"second", "0"}});
  const sdk::Decision d = surgery->decide(step_with(7, 3.0));
  EXPECT_EQ(d.action, Action::kContinue);
  EXPECT_EQ(d.moment_scales, "blocks.*.attn.*:1:0;head.weight:1:0");
  EXPECT_NE(d.reason.find("at = resume"), std::string::npos) << d.reason;
  EXPECT_TRUE(surgery->decide(step_with(8, 3.0)).moment_scales.empty()) << "once only";
  EXPECT_EQ(surgery->save_state().json, "{\"fired\": 1, \"last_fired_step\": 7}");

  // A resumed branch loads that state and does not repeat the surgery.
  auto resumed = make_plugin("moment_surgery", {{"pattern", "blocks.*.attn.*, head.weight"}, {"second", "0"}});
  resumed->load_state(surgery->save_state());
  EXPECT_TRUE(resumed->decide(step_with(9, 3.0)).moment_scales.empty());
}

TEST(MomentSurgery, FactorsAreWrittenSoKeelAppliesExactlyThem) {
  auto surgery =
      make_plugin("moment_surgery", {{"first", "0.1"}, {"second", "0.3333333333333333"}, {"action", "skip"}});
  const sdk::Decision d = surgery->decide(step_with(0, 3.0));
  EXPECT_EQ(d.action, Action::kSkipUpdate);
  EXPECT_EQ(d.moment_scales, "*:0.10000000000000001:0.33333333333333331");
  EXPECT_EQ(std::stod("0.10000000000000001"), 0.1);
  EXPECT_EQ(std::stod("0.33333333333333331"), 0.3333333333333333);
}

TEST(MomentSurgery, AtStepFiresAtTheFirstStepAtOrAfterIt) {
  auto surgery = make_plugin("moment_surgery", {{"at", "step"}, {"step", "5"}, {"first", "0.5"}});
  EXPECT_TRUE(surgery->decide(step_with(3, 3.0)).moment_scales.empty());
  EXPECT_TRUE(surgery->decide(step_with(4, 3.0)).moment_scales.empty());
  EXPECT_EQ(surgery->decide(step_with(6, 3.0)).moment_scales, "*:0.5:1");  // step 5 was not decided (non-finite)
  EXPECT_TRUE(surgery->decide(step_with(7, 3.0)).moment_scales.empty());
}

TEST(MomentSurgery, AtSpikeActsOnEverySpikeOfTheSharedDetector) {
  auto surgery = make_plugin("moment_surgery", {{"at", "spike"},
                                                {"min_history", "4"},
                                                {"threshold", "4"},
                                                {"first", "0"},
                                                {"second", "0"},
                                                {"pattern", "blocks.1.*"}});
  for (int64_t s = 0; s < 6; ++s) EXPECT_EQ(surgery->decide(step_with(s, s % 2 ? 3.0 : 2.0)).action, Action::kContinue);
  sdk::Decision d = surgery->decide(step_with(6, 50.0));
  EXPECT_EQ(d.action, Action::kSkipUpdate);
  EXPECT_EQ(d.moment_scales, "blocks.1.*:0:0");
  EXPECT_NE(d.reason.find("step 6: loss 50 has z-score"), std::string::npos) << d.reason;
  EXPECT_EQ(surgery->decide(step_with(7, 2.0)).action, Action::kContinue);
  EXPECT_EQ(surgery->decide(step_with(8, 60.0)).moment_scales, "blocks.1.*:0:0") << "every spike";
  // Its windows are in the state, as zscore_skip's.
  const sdk::PluginState state = surgery->save_state();
  EXPECT_EQ(state.json, "{\"fired\": 2, \"last_fired_step\": 8}");
  ASSERT_EQ(state.tensors.size(), 2u);
  EXPECT_EQ(state.tensors[0].first, "loss_window");
  EXPECT_EQ(state.tensors[0].second.numel(), 7);

  auto rollback = make_plugin("moment_surgery", {{"at", "spike"}, {"action", "rollback"}, {"first", "0"}});
  for (int64_t s = 0; s < 12; ++s) rollback->decide(step_with(s, s % 2 ? 3.0 : 2.0));
  d = rollback->decide(step_with(12, 90.0));
  EXPECT_EQ(d.action, Action::kRollback);
  EXPECT_EQ(d.moment_scales, "*:0:1");
}

TEST(MomentSurgery, WarmStartFillsTheDetectorOnlyAtSpike) {
  const auto library = load_plugin_library("moment_surgery");
  EXPECT_TRUE(library->description().warm_start);
  sdk::WarmStartHistory history;
  history.start_step = 20;
  for (int64_t s = 0; s < 20; ++s) history.rows.push_back({s, s % 2 ? 3.0 : 2.0, 1.0, false});
  auto spike = library->create({{"at", "spike"}, {"second", "0"}});
  EXPECT_EQ(library->warm_start(*spike, history).rows_used, 20);
  EXPECT_EQ(spike->decide(step_with(20, 40.0)).moment_scales, "*:1:0") << "warm: the first step can already be a spike";
  auto resume = library->create({{"second", "0"}});
  const sdk::WarmStartResult r = library->warm_start(*resume, history);
  EXPECT_EQ(r.rows_used, 0);
  EXPECT_EQ(r.inactive_steps, 0);
}

TEST(MomentSurgery, RefusesBadArgumentsNamingTheKey) {
  const std::vector<std::pair<sdk::Args, std::string>> cases = {
      {{{"at", "never"}, {"first", "0"}}, "'at'"},
      {{{"first", "-1"}}, "'first'"},
      {{{"second", "nan"}}, "'second'"},
      {{{"first", "half"}}, "'first'"},
      {{}, "'first' and 'second' are both 1"},
      {{{"first", "1"}, {"second", "1"}}, "'first' and 'second' are both 1"},
      {{{"at", "step"}, {"first", "0"}}, "'step' is required"},
      {{{"at", "step"}, {"step", "-2"}, {"first", "0"}}, "'step'"},
      {{{"step", "4"}, {"first", "0"}}, "'step' is only for at = step"},
      {{{"window", "20"}, {"first", "0"}}, "'window' is only for at = spike"},
      {{{"at", "spike"}, {"window", "1"}, {"first", "0"}}, "'window'"},
      {{{"action", "rollback"}, {"first", "0"}}, "'action'"},
      {{{"at", "spike"}, {"action", "stop"}, {"first", "0"}}, "'action'"},
      {{{"pattern", "a:b"}, {"first", "0"}}, "'pattern'"},
      {{{"pattern", "a,,b"}, {"first", "0"}}, "'pattern'"},
      {{{"second", "0.5"}, {"plugins.optimizer", "lion"}}, "optimizer lion keeps none"},
  };
  for (const auto& [args, message] : cases) {
    const std::string refusal = refusal_of("moment_surgery", args);
    EXPECT_NE(refusal.find("moment_surgery"), std::string::npos) << message << ": " << refusal;
    EXPECT_NE(refusal.find(message), std::string::npos) << message << ": " << refusal;
  }
  // With lion, first moments alone are fine.
  EXPECT_EQ(refusal_of("moment_surgery", {{"first", "0"}, {"plugins.optimizer", "lion"}}), "(accepted)");
}

}  // namespace
}  // namespace keel::testing

// Why: a spike handler added at a resume decides from the history Keel hands it through the optional warm-start
// hook (keel/plugin.h), not blind for its first min_history steps. Pinned here on the built-in libraries as Keel
// loads them: which ones export the hook, that a warm-started zscore_skip catches a spike a fresh one lets
// through, that history spikes stay out of the windows, what an empty history reports, and the refusals (a
// library without the hook; structs of another size, as a plugin built against another SDK would see them).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

using Action = sdk::Decision::Action;

// Steps [0, n): losses alternating 2 and 3 (mean 2.5, std 0.5), grad norms 1 and 1.5.
sdk::WarmStartHistory steady_history(int64_t n) {
  sdk::WarmStartHistory h;
  h.start_step = n;
  h.source = "test";
  for (int64_t step = 0; step < n; ++step)
    h.rows.push_back({step, step % 2 == 0 ? 2.0 : 3.0, step % 2 == 0 ? 1.0 : 1.5, false});
  return h;
}

sdk::StepContext spike_at(int64_t step) {
  sdk::StepContext ctx;
  ctx.step = step;
  ctx.loss = 10.0;  // z = 15 against mean 2.5, std 0.5
  ctx.grad_norm = 1.25;
  return ctx;
}

TEST(WarmStart, SpikeHandlersWithAWindowExportTheHookAndOthersDoNot) {
  EXPECT_TRUE(load_plugin_library("zscore_skip")->description().warm_start);
  EXPECT_TRUE(load_plugin_library("lr_cooldown")->description().warm_start);
  EXPECT_FALSE(load_plugin_library("adamw")->description().warm_start);
}

TEST(WarmStart, AWarmStartedZscoreSkipCatchesTheSpikeAFreshOneLetsThrough) {
  const auto library = load_plugin_library("zscore_skip");
  auto fresh = library->create({});
  EXPECT_EQ(fresh->decide(spike_at(30)).action, Action::kContinue) << "a fresh handler has no window yet";

  auto warm = library->create({});
  const sdk::WarmStartResult result = library->warm_start(*warm, steady_history(30));
  EXPECT_EQ(result.rows_used, 30);
  EXPECT_EQ(result.inactive_steps, 0);
  const sdk::Decision d = warm->decide(spike_at(30));
  EXPECT_EQ(d.action, Action::kSkipUpdate);
  EXPECT_EQ(d.reason, "step 30: loss 10 has z-score 15 > 6 (mean 2.5, std 0.5 over the last 30 steps)");
  // The windows are the state a checkpoint saves: the warm start is in them.
  const sdk::PluginState state = warm->save_state();
  ASSERT_EQ(state.tensors.size(), 2u);
  EXPECT_EQ(state.tensors[0].second.numel(), 30);
}

TEST(WarmStart, SpikesAndNonFiniteRowsOfTheHistoryStayOutOfTheWindows) {
  const auto library = load_plugin_library("lr_cooldown");
  auto handler = library->create({});
  sdk::WarmStartHistory h = steady_history(30);
  h.rows.push_back({30, 50.0, 1.0, false});                                     // a spike the parent let through
  h.rows.push_back({31, std::numeric_limits<double>::quiet_NaN(), 1.0, true});  // a non-finite step Keel skipped
  h.rows.push_back({32, 2.0, 1.0, false});
  h.rows.push_back({33, 3.0, 1.5, false});
  const sdk::WarmStartResult result = library->warm_start(*handler, h);
  EXPECT_EQ(result.rows_used, 34);
  const sdk::Decision d = handler->decide(spike_at(34));
  EXPECT_NEAR(d.lr_factor, 0.3, 1e-12) << "a spike against mean 2.5, std 0.5: " << d.reason;
  EXPECT_NE(d.reason.find("mean 2.5, std 0.5 over the last 32 steps"), std::string::npos) << d.reason;
}

TEST(WarmStart, NoHistoryReportsHowLongTheHandlerIsInactive) {
  const auto library = load_plugin_library("zscore_skip");
  auto handler = library->create({{"min_history", "8"}});
  sdk::WarmStartHistory empty;
  empty.start_step = 40;
  sdk::WarmStartResult result = library->warm_start(*handler, empty);
  EXPECT_EQ(result.rows_used, 0);
  EXPECT_EQ(result.inactive_steps, 8);
  result = library->warm_start(*library->create({{"min_history", "8"}}), steady_history(5));
  EXPECT_EQ(result.rows_used, 5);
  EXPECT_EQ(result.inactive_steps, 3);
}

TEST(WarmStart, ALibraryWithoutTheHookIsRefusedNamingIt) {
  const auto library = load_plugin_library("adamw");
  auto optimizer = library->create({});
  const std::string error = error_of([&] { library->warm_start(*optimizer, steady_history(3)); });
  EXPECT_NE(error.find("plugin adamw ("), std::string::npos) << error;
  EXPECT_NE(error.find("has no warm-start entry point"), std::string::npos) << error;
}

TEST(WarmStart, StructsOfAnotherSizeAreRefusedBeforeAnyFieldIsRead) {
  const auto library = load_plugin_library("zscore_skip");  // keeps the file loaded; dlopen shares its handle
  auto handler = library->create({});
  void* handle = dlopen(plugin_path("zscore_skip").c_str(), RTLD_LAZY | RTLD_LOCAL);
  ASSERT_NE(handle, nullptr) << dlerror();
  const auto fn = reinterpret_cast<sdk::WarmStartFn>(dlsym(handle, "keel_plugin_warm_start"));
  ASSERT_NE(fn, nullptr);
  sdk::WarmStartHistory history = steady_history(30);
  history.struct_size = 8;  // what a host built against another SDK might pass
  sdk::WarmStartResult result;
  char error[256] = {0};
  EXPECT_EQ(fn(handler.get(), &history, &result, error, sizeof(error)), 1);
  EXPECT_NE(std::string(error).find("rebuild the plugin against this SDK"), std::string::npos) << error;
  EXPECT_EQ(result.rows_used, 0);
  EXPECT_EQ(handler->decide(spike_at(30)).action, Action::kContinue) << "nothing entered the windows";
  dlclose(handle);
}

}  // namespace
}  // namespace keel::testing

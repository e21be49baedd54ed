// Why: a data_mixture plugin decides what the model reads at every step, and a typo in its weights would
// silently change that, so the tests pin the weights returned at chosen steps and every refusal (bad weights,
// bad steps, unknown sources), each naming the argument at fault.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

const std::vector<std::string> kSources = {"prose", "code"};

bool refused_naming(const std::string& plugin, const sdk::Args& args, const std::string& arg,
                    const std::string& detail = "") {
  const std::string refusal = refusal_of(plugin, args);
  const bool ok =
      refusal.find("argument '" + arg + "'") != std::string::npos && refusal.find(detail) != std::string::npos;
  if (!ok)
    ADD_FAILURE() << "refusal of " << plugin << " does not name '" << arg << "' / '" << detail << "': " << refusal;
  return ok;
}

// ------------------------------------------------------------------------------------------------ static

TEST(StaticMixture, ReturnsTheWeightsAtEveryStep) {
  auto mixture = make_plugin("static", {{"weights", "prose=0.3, code=0.7"}});
  for (const int64_t step : {0, 1, 999, 123456789})
    EXPECT_EQ(mixture->mixture_at(step, kSources), "prose=0.3,code=0.7");
}

TEST(StaticMixture, RefusesBadWeights) {
  refused_naming("static", {}, "weights", "is required");
  refused_naming("static", {{"weights", "prose=abc"}}, "weights", "weight of 'prose' must be a finite number >= 0");
  refused_naming("static", {{"weights", "prose=-1,code=1"}}, "weights", "weight of 'prose'");
  refused_naming("static", {{"weights", "prose=inf"}}, "weights", "weight of 'prose'");
  refused_naming("static", {{"weights", "prose=0,code=0"}}, "weights", "sum to 0");
  refused_naming("static", {{"weights", "prose=1,prose=2"}}, "weights", "given twice");
  refused_naming("static", {{"weights", "prose"}}, "weights", "expected name=weight");
  refused_naming("static", {{"weights", "=1"}}, "weights", "without a source name");
  refused_naming("static", {{"weights", "prose=1,"}}, "weights", "expected name=weight");
}

TEST(StaticMixture, RefusesAnUnknownSourceWhenAsked) {
  auto mixture = make_plugin("static", {{"weights", "prose=0.3,cod=0.7"}});
  const std::string error = error_of([&] { mixture->mixture_at(0, kSources); });
  EXPECT_NE(error.find("unknown source 'cod'"), std::string::npos) << error;
  EXPECT_NE(error.find("(sources of this run: prose, code)"), std::string::npos) << error;
}

// ------------------------------------------------------------------------------------------------ staged

const char* const kCrystalCoderStages = "0:prose=0.7,code=0.3;1000:prose=0.4,code=0.6;2000:prose=0.1,code=0.9";

TEST(StagedMixture, ReturnsTheActiveStagesWeights) {
  auto mixture = make_plugin("staged", {{"stages", kCrystalCoderStages}});
  EXPECT_EQ(mixture->mixture_at(0, kSources), "prose=0.7,code=0.3");
  EXPECT_EQ(mixture->mixture_at(999, kSources), "prose=0.7,code=0.3");
  EXPECT_EQ(mixture->mixture_at(1000, kSources), "prose=0.4,code=0.6");
  EXPECT_EQ(mixture->mixture_at(1999, kSources), "prose=0.4,code=0.6");
  EXPECT_EQ(mixture->mixture_at(2000, kSources), "prose=0.1,code=0.9");
  EXPECT_EQ(mixture->mixture_at(1000000, kSources), "prose=0.1,code=0.9");
}

TEST(StagedMixture, StagesInAnyOrderAndNoChangeBeforeTheFirst) {
  auto mixture = make_plugin("staged", {{"stages", "500:code=1;100:prose=1;"}});
  EXPECT_EQ(mixture->mixture_at(99, kSources), "");
  EXPECT_EQ(mixture->mixture_at(100, kSources), "prose=1");
  EXPECT_EQ(mixture->mixture_at(500, kSources), "code=1");
}

TEST(StagedMixture, RefusesBadStagesAndUnknownSources) {
  refused_naming("staged", {}, "stages", "is required");
  refused_naming("staged", {{"stages", "prose=1"}}, "stages", "expected STEP:name=weight");
  refused_naming("staged", {{"stages", "x:prose=1"}}, "stages", "expected a step");
  refused_naming("staged", {{"stages", "-5:prose=1"}}, "stages", "expected a step");
  refused_naming("staged", {{"stages", "0:prose=1;0:code=1"}}, "stages", "two stages start at step 0");
  refused_naming("staged", {{"stages", "0:prose=1;10:code=abc"}}, "stages", "weight of 'code'");
  refused_naming("staged", {{"stages", ";"}}, "stages", "no stage");
  auto mixture = make_plugin("staged", {{"stages", "0:prose=1;10:web=1"}});
  const std::string error = error_of([&] { mixture->mixture_at(0, kSources); });
  EXPECT_NE(error.find("argument 'stages' names unknown source 'web'"), std::string::npos) << error;
}

// ------------------------------------------------------------------------------------------------ linear_ramp

sdk::Args ramp_args() {
  return {{"from", "prose=0.8,code=0.2"}, {"to", "prose=0.2,code=0.8"}, {"start_step", "100"}, {"end_step", "200"}};
}

TEST(LinearRamp, InterpolatesBetweenStartAndEnd) {
  auto mixture = make_plugin("linear_ramp", ramp_args());
  EXPECT_EQ(mixture->mixture_at(0, kSources), "prose=0.8,code=0.2");
  EXPECT_EQ(mixture->mixture_at(100, kSources), "prose=0.8,code=0.2");
  EXPECT_EQ(mixture->mixture_at(125, kSources), "prose=0.65,code=0.35");
  EXPECT_EQ(mixture->mixture_at(150, kSources), "prose=0.5,code=0.5");
  EXPECT_EQ(mixture->mixture_at(199, kSources), "prose=0.206,code=0.794");
  EXPECT_EQ(mixture->mixture_at(200, kSources), "prose=0.2,code=0.8");
  EXPECT_EQ(mixture->mixture_at(5000, kSources), "prose=0.2,code=0.8");
}

TEST(LinearRamp, NormalizesAndCoversSourcesNamedOnlyOnOneSide) {
  auto mixture = make_plugin("linear_ramp", {{"from", "prose=7,code=3"}, {"to", "code=1"}, {"end_step", "10"}});
  EXPECT_EQ(mixture->mixture_at(0, kSources), "prose=0.7,code=0.3");
  EXPECT_EQ(mixture->mixture_at(5, kSources), "prose=0.35,code=0.65");
  EXPECT_EQ(mixture->mixture_at(10, kSources), "prose=0,code=1");
  auto growing = make_plugin("linear_ramp", {{"from", "prose=1"}, {"to", "code=1"}, {"end_step", "4"}});
  EXPECT_EQ(growing->mixture_at(1, kSources), "prose=0.75,code=0.25");
}

TEST(LinearRamp, WeightsAreRoundedToFourDecimals) {
  // A long ramp: 0.6 of weight moves over 30000 steps (2e-5 per step), so the text may change at most
  // 0.6 / 1e-4 = 6000 times, and every weight has at most four decimals.
  auto mixture = make_plugin(
      "linear_ramp",
      {{"from", "prose=0.8,code=0.2"}, {"to", "prose=0.2,code=0.8"}, {"start_step", "0"}, {"end_step", "30000"}});
  std::set<std::string> seen;
  std::string previous;
  int changes = 0;
  for (int64_t step = 0; step <= 30000; ++step) {
    const std::string now = mixture->mixture_at(step, kSources);
    if (now != previous) ++changes;
    previous = now;
    if (step % 997 == 0) seen.insert(now);
  }
  EXPECT_LE(changes, 6001);
  EXPECT_GE(changes, 5000);
  for (const auto& text : seen) {
    for (const auto& part :
         {text.substr(text.find('=') + 1, text.find(',') - text.find('=') - 1), text.substr(text.rfind('=') + 1)}) {
      const size_t dot = part.find('.');
      EXPECT_TRUE(dot == std::string::npos || part.size() - dot - 1 <= 4) << text;
    }
  }
}

TEST(LinearRamp, RefusesBadArgumentsAndUnknownSources) {
  sdk::Args args = ramp_args();
  args.erase("to");
  refused_naming("linear_ramp", args, "to", "is required");
  args = ramp_args();
  args.erase("end_step");
  refused_naming("linear_ramp", args, "end_step", "is required");
  args = ramp_args();
  args["end_step"] = "100";
  refused_naming("linear_ramp", args, "end_step", "must be > start_step");
  args = ramp_args();
  args["start_step"] = "-1";
  refused_naming("linear_ramp", args, "start_step", ">= 0");
  args = ramp_args();
  args["end_step"] = "soon";
  refused_naming("linear_ramp", args, "end_step", "not an integer");
  args = ramp_args();
  args["from"] = "prose=0.8;code=0.2";
  refused_naming("linear_ramp", args, "from", "weight of 'prose'");
  args = ramp_args();
  args["to"] = "prose=0,code=0";
  refused_naming("linear_ramp", args, "to", "sum to 0");

  args = ramp_args();
  args["to"] = "prose=0.2,math=0.8";
  auto mixture = make_plugin("linear_ramp", args);
  const std::string error = error_of([&] { mixture->mixture_at(150, kSources); });
  EXPECT_NE(error.find("argument 'to' names unknown source 'math'"), std::string::npos) << error;
}

}  // namespace
}  // namespace keel::testing

// Why: `keel tournament` is only as good as its arms file and its statistics. The arms file must expand every
// shorthand into exactly the overrides and plugins docs/forensics.md promises and refuse every malformed line by
// file and line; the replicates must start whole chunks further along each source; the paired bootstrap must give
// the exact interval when every difference is the same and a reproducible one otherwise, and the verdict must say
// "no clear winner" when the best and the runner-up cannot be told apart.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/forensics/tournament.h"

namespace keel::forensics {
namespace {

using Strings = std::vector<std::string>;

// The message of the TournamentError that parsing `text` throws ("" when it parses).
std::string parse_error(const std::string& text) {
  try {
    parse_arms(text, "arms.ini");
  } catch (const TournamentError& e) {
    return e.what();
  }
  return "";
}

TEST(TournamentArms, ShorthandsExpandToTheirOverridesAndPlugins) {
  const std::vector<Arm> arms = parse_arms(
      "# remediations\n"
      "[arm.baseline]\n"
      "[arm.skip]\n"
      "skip_spikes = true\n"
      "skip_spikes_threshold = 4\n"
      "[arm.cool]\n"
      "lr_factor = 0.3\n"
      "lr_steps = 20   # twenty steps\n"
      "[arm.eps]\n"
      "eps = 1e-6\n"
      "[arm.clip]\n"
      "update_clip = 2e-3\n"
      "[arm.reset]\n"
      "reset_moments = *.attn.*,embed.weight\n"
      "moments_at = spike\n"
      "[arm.mine]\n"
      "set = optim.grad_clip=0.5 train.log_every=1\n"
      "plugin = grad_transform=/tmp/libmine.so\n"
      "plugin_arg = mine.alpha=2 mine.beta=3\n"
      "embedding_grad_shrink = 0.1\n",
      "arms.ini");
  ASSERT_EQ(arms.size(), 7u);
  EXPECT_EQ(baseline_index(arms), 0u);
  EXPECT_TRUE(arms[0].baseline) << "the arm named baseline is the control";
  EXPECT_TRUE(arms[0].entries.empty());
  EXPECT_EQ(arms[1].plugins(), Strings({"spike_handler=zscore_skip"}));
  EXPECT_EQ(arms[1].plugin_args(), Strings({"zscore_skip.threshold=4"}));
  EXPECT_EQ(arms[2].plugins(), Strings({"spike_handler=lr_cooldown"}));
  EXPECT_EQ(arms[2].plugin_args(), Strings({"lr_cooldown.lr_factor=0.3", "lr_cooldown.cooldown_steps=20"}));
  EXPECT_EQ(arms[2].entries[1].text, "lr_steps = 20");
  EXPECT_EQ(arms[2].entries[1].line, 8);
  EXPECT_EQ(arms[3].overrides(), Strings({"optim.eps=1e-6"}));
  EXPECT_EQ(arms[4].plugins(), Strings({"grad_transform=update_clip"}));
  EXPECT_EQ(arms[4].plugin_args(), Strings({"update_clip.max_rms=2e-3"}));
  EXPECT_EQ(arms[5].plugins(), Strings({"spike_handler=moment_surgery"}));
  EXPECT_EQ(arms[5].plugin_args(), Strings({"moment_surgery.pattern=*.attn.*,embed.weight", "moment_surgery.first=0",
                                            "moment_surgery.second=0", "moment_surgery.at=spike"}));
  EXPECT_EQ(arms[6].overrides(), Strings({"optim.grad_clip=0.5", "train.log_every=1"}));
  EXPECT_EQ(arms[6].plugins(), Strings({"grad_transform=/tmp/libmine.so", "grad_transform=embedding_grad_shrink"}));
  EXPECT_EQ(arms[6].plugin_args(), Strings({"mine.alpha=2", "mine.beta=3", "embedding_grad_shrink.alpha=0.1"}));
  EXPECT_EQ(arms[6].line, 16);
}

TEST(TournamentArms, ScaleMomentsAndOneHandlerAskedForTwice) {
  const std::vector<Arm> arms = parse_arms(
      "[arm.baseline]\n[arm.s]\nscale_moments = *:1:0.25\n[arm.r]\nrollback = true\nplugin = "
      "spike_handler=rollback_skip\n"
      "plugin_arg = rollback_skip.reset_moments=true\n",
      "x.ini");
  EXPECT_EQ(arms[1].plugins(), Strings({"spike_handler=moment_surgery"}));
  EXPECT_EQ(arms[1].plugin_args(),
            Strings({"moment_surgery.pattern=*", "moment_surgery.first=1", "moment_surgery.second=0.25"}));
  EXPECT_EQ(arms[2].plugins(), Strings({"spike_handler=rollback_skip"})) << "one handler, asked for twice";
  EXPECT_EQ(arms[2].plugin_args(), Strings({"rollback_skip.reset_moments=true"}));
}

TEST(TournamentArms, BaselineTrueMarksTheControl) {
  const std::vector<Arm> arms = parse_arms("[arm.a]\neps = 1e-6\n[arm.control]\nbaseline = true\n", "x.ini");
  EXPECT_EQ(baseline_index(arms), 1u);
  EXPECT_FALSE(arms[0].baseline);
}

TEST(TournamentArms, MalformedFilesAreRefusedByFileAndLine) {
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nlr = 3\n").rfind("arms.ini:3: [arm.a]: unknown key 'lr'", 0), 0u);
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\neps = big\n"),
            "arms.ini:3: [arm.a]: 'eps' needs a number, got 'big'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arms.a]\n").rfind("arms.ini:2: section [arms.a]: expected [arm.NAME]", 0),
            0u);
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a-b]\n").rfind("arms.ini:2: section [arm.a-b]", 0), 0u);
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\n[arm.a]\n"), "arms.ini:3: arm 'a' again (first at line 2)");
  EXPECT_EQ(parse_error("eps = 1\n[arm.baseline]\n"), "arms.ini:1: 'eps = 1' before any [arm.NAME] section");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\njust words\n"),
            "arms.ini:3: expected 'key = value', got 'just words'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nset = optim.lr\n"),
            "arms.ini:3: [arm.a]: 'set' takes KEY=VALUE words, got 'optim.lr'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nplugin_arg = alpha=2\n"),
            "arms.ini:3: [arm.a]: 'plugin_arg' takes NAME.KEY=VALUE words, got 'alpha=2'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nlr_factor = 2\n"),
            "arms.ini:3: [arm.a]: 'lr_factor' must be in (0, 1], got 2");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nskip_spikes = yes\n"),
            "arms.ini:3: [arm.a]: 'skip_spikes' needs true or false, got 'yes'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nskip_spikes = true\nlr_factor = 0.5\n"),
            "arms.ini:4: [arm.a]: 'lr_factor' needs spike_handler = lr_cooldown, but 'skip_spikes' (line 3) already "
            "chose zscore_skip: one spike handler per arm");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nlr_steps = 5\n"),
            "arms.ini:3: [arm.a]: 'lr_steps' needs 'lr_factor' in the same arm");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nupdate_clip =\n"), "arms.ini:3: [arm.a]: 'update_clip' has no value");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nscale_moments = *:0.5\n"),
            "arms.ini:3: [arm.a]: 'scale_moments' takes GLOB:FIRST:SECOND, got '*:0.5'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nreset_moments = *\nmoments_at = later\n"),
            "arms.ini:4: [arm.a]: 'moments_at' is resume or spike, got 'later'");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nmoments_at = spike\n"),
            "arms.ini:3: [arm.a]: 'moments_at' needs 'reset_moments' in the same arm");
  EXPECT_EQ(parse_error("[arm.baseline]\n[arm.a]\nskip_spikes = true\nreset_moments = *\n"),
            "arms.ini:4: [arm.a]: 'reset_moments' needs spike_handler = moment_surgery, but 'skip_spikes' (line 3) "
            "already chose zscore_skip: one spike handler per arm");
  EXPECT_EQ(parse_error("[arm.baseline]\n"),
            "arms.ini: 1 arm(s); a tournament needs at least two [arm.NAME] sections (one the baseline)");
  EXPECT_EQ(parse_error("[arm.a]\n[arm.b]\n"),
            "arms.ini: no baseline arm: name one [arm.baseline] or give one arm 'baseline = true'");
  EXPECT_EQ(parse_error("[arm.a]\nbaseline = true\n[arm.b]\nbaseline = true\n"),
            "arms.ini:3: [arm.b]: a second 'baseline = true' (arm 'a' is the baseline)");
  try {
    read_arms("/nonexistent/arms.ini");
    FAIL() << "a missing arms file must be refused";
  } catch (const TournamentError& e) {
    EXPECT_STREQ(e.what(), "cannot read the arms file /nonexistent/arms.ini");
  }
}

TEST(TournamentReplicates, EachReplicateStartsWholeChunksFurtherAlong) {
  // 36 chunks of 360 samples: prose at position 25 (chunk 2), code at 350 (chunk 35, the last).
  const std::vector<SourceCursor> cursors{{"prose", 25, 360}, {"code", 350, 360}};
  EXPECT_EQ(replicate_skip_rules(cursors, 36, 0, 3), "");
  EXPECT_EQ(replicate_skip_rules(cursors, 36, 1, 3), "prose:chunk:2-13;code:chunk:35;code:chunk:0-10");
  EXPECT_EQ(replicate_skip_rules(cursors, 36, 2, 3), "prose:chunk:2-25;code:chunk:35;code:chunk:0-22");
  EXPECT_EQ(replicate_skip_rules({{"one", 0, 36}}, 36, 1, 36), "one:chunk:0");
  EXPECT_THROW(replicate_skip_rules(cursors, 2, 1, 3), TournamentError);
  const auto parsed = ledger_cursors(R"({"sources": [{"name": "prose", "epoch": 0, "position": 7, "consumed": 7,
                                        "skipped": 0, "samples_per_epoch": 90}]})");
  ASSERT_EQ(parsed.size(), 1u);
  EXPECT_EQ(parsed[0].name, "prose");
  EXPECT_EQ(parsed[0].position, 7);
  EXPECT_EQ(parsed[0].samples_per_epoch, 90);
  EXPECT_THROW(ledger_cursors("{}"), TournamentError);
}

TEST(TournamentStats, PairedBootstrapIsExactForAConstantDifferenceAndReproducible) {
  const std::vector<double> b{1.0, 2.0, 3.0, 4.0};
  const PairedDiff same = paired_bootstrap({1.5, 2.5, 3.5, 4.5}, b, 500, 7);
  EXPECT_DOUBLE_EQ(same.mean, 0.5);
  EXPECT_DOUBLE_EQ(same.lo, 0.5);
  EXPECT_DOUBLE_EQ(same.hi, 0.5);
  const std::vector<double> a{1.1, 1.7, 3.4, 3.9};
  const PairedDiff d1 = paired_bootstrap(a, b, 2000, 7), d2 = paired_bootstrap(a, b, 2000, 7);
  EXPECT_DOUBLE_EQ(d1.lo, d2.lo) << "one seed, one interval";
  EXPECT_NEAR(d1.mean, 0.025, 1e-12);
  EXPECT_LE(d1.lo, d1.mean);
  EXPECT_GE(d1.hi, d1.mean);
  EXPECT_GE(d1.lo, -0.3);  // the smallest difference is -0.3, the largest +0.4
  EXPECT_LE(d1.hi, 0.4);
  EXPECT_THROW(paired_bootstrap({1.0}, b, 100, 1), TournamentError);
  EXPECT_THROW(paired_bootstrap({}, {}, 100, 1), TournamentError);
}

TEST(TournamentStats, TheWinnerNeedsAnIntervalBelowZeroAgainstTheRunnerUp) {
  std::vector<double> base, better, worse, tie;
  for (int i = 0; i < 40; ++i) {
    const double x = 3.0 + 0.1 * (i % 7);
    base.push_back(x);
    better.push_back(x - 0.2 + 0.01 * (i % 3));
    worse.push_back(x + 0.5);
    tie.push_back(x - 0.2 + 0.01 * ((i + 1) % 3));  // as good as `better`, unit by unit within +-0.02
  }
  const TournamentVerdict clear = decide({{"baseline", base}, {"better", better}, {"worse", worse}}, 0, 2000, 3);
  EXPECT_EQ(clear.best, 1u);
  EXPECT_EQ(clear.runner_up, 0u);
  EXPECT_TRUE(clear.clear);
  EXPECT_LT(clear.best_vs_runner_up.hi, 0);
  EXPECT_DOUBLE_EQ(clear.vs_baseline[0].mean, 0.0);
  EXPECT_NEAR(clear.vs_baseline[2].mean, 0.5, 1e-12);
  EXPECT_NEAR(clear.vs_baseline[2].lo, 0.5, 1e-12);

  const TournamentVerdict close = decide({{"baseline", base}, {"better", better}, {"tie", tie}}, 0, 2000, 3);
  EXPECT_FALSE(close.clear) << "best " << close.best << " vs " << close.runner_up << ": [" << close.best_vs_runner_up.lo
                            << ", " << close.best_vs_runner_up.hi << "]";
  EXPECT_LE(close.best_vs_runner_up.lo, 0);
  EXPECT_GE(close.best_vs_runner_up.hi, 0);
}

TEST(TournamentStats, TheTableShowsEveryArmAndTheVerdict) {
  const nlohmann::json r = {
      {"checkpoint", "run/checkpoints/step-00000004"},
      {"from_step", 4},
      {"steps", 3},
      {"seeds", 1},
      {"measure", "held-out"},
      {"test", "paired bootstrap"},
      {"arms",
       {{{"name", "baseline"},
         {"baseline", true},
         {"changes", nlohmann::json::array()},
         {"mean_nll", 5.0},
         {"vs_baseline", {{"mean_diff", 0.0}, {"ci95", {0.0, 0.0}}}}},
        {{"name", "eps"},
         {"baseline", false},
         {"changes", {"eps = 1e-6"}},
         {"mean_nll", 4.9},
         {"vs_baseline", {{"mean_diff", -0.1}, {"ci95", {-0.15, -0.05}}}}}}},
      {"verdict", "winner: eps"},
      {"winner_vs_runner_up",
       {{"best", "eps"}, {"runner_up", "baseline"}, {"mean_diff", -0.1}, {"ci95", {-0.15, -0.05}}}}};
  const std::string table = format_table(r);
  EXPECT_NE(table.find("2 arms x 1 replicate(s) from run/checkpoints/step-00000004 (step 4), 3 steps"),
            std::string::npos)
      << table;
  EXPECT_NE(table.find("(baseline)"), std::string::npos) << table;
  EXPECT_NE(table.find("-0.1000  [-0.1500, -0.0500]"), std::string::npos) << table;
  EXPECT_NE(table.find("  eps = 1e-6\n"), std::string::npos) << table;
  EXPECT_NE(table.find("winner: eps"), std::string::npos) << table;
}

}  // namespace
}  // namespace keel::forensics

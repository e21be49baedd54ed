// Why: train.batch_schedule decides how many sequences every later step trains on, so a typo must stop the run
// before it starts, naming the key and the step; a schedule that does not divide into the layout's micro-batches
// must be refused the same way; and a config without the key must read, write and hash exactly as before it
// existed (resumes of older run dirs).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>

#include "core/config/batch_schedule.h"
#include "core/config/config.h"

namespace {

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const keel::ConfigError& e) {
    return e.what();
  }
  return "";
}

// A config of micro_batch 2 x grad_accum 4 (global batch 8) with `extra` INI lines appended to [train].
keel::Config config_with(const std::string& train_lines, const std::string& parallel_lines = "") {
  return keel::parse_config_text(
      "[train]\nmicro_batch = 2\ngrad_accum = 4\n" + train_lines + "[parallel]\n" + parallel_lines, "schedule.ini");
}

}  // namespace

TEST(BatchSchedule, ParsesStagesInStepOrder) {
  const auto stages = keel::parse_batch_schedule(" 0:8 ; 100:16;250:32;");
  ASSERT_EQ(stages.size(), 3u);
  EXPECT_EQ(stages[0].from_step, 0);
  EXPECT_EQ(stages[0].global_batch, 8);
  EXPECT_EQ(stages[2].from_step, 250);
  EXPECT_EQ(stages[2].global_batch, 32);
  EXPECT_EQ(stages[1].origin, "train.batch_schedule");
  EXPECT_EQ(keel::batch_at(stages, 0), 8);
  EXPECT_EQ(keel::batch_at(stages, 99), 8);
  EXPECT_EQ(keel::batch_at(stages, 100), 16);
  EXPECT_EQ(keel::batch_at(stages, 1000000), 32);
}

TEST(BatchSchedule, BadSchedulesAreRefusedNamingTheKeyAndTheEntry) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"8", "expected STEP:BATCH (e.g. 0:8;100:16), got '8'"},
      {"10:8;20:16", "the first entry must be at step 0, got step 10"},
      {"0:8;100:16;50:32", "steps must increase, but step 50 follows step 100"},
      {"0:8;100:16;100:32", "steps must increase, but step 100 follows step 100"},
      {"0:8;100:0", "the global batch from step 100 must be >= 1 sequence, got 0"},
      {"0:8;100:x", "the global batch must be a non-negative integer, got 'x' in '100:x'"},
      {"0:8;-5:16", "the step must be a non-negative integer, got '-5'"},
      {"0:8;5:99999999999999999999", "the global batch must be a non-negative integer"},
      {" ; ", "no STEP:BATCH entry"},
  };
  for (const auto& [text, want] : cases) {
    const std::string message = error_of([&] { keel::parse_batch_schedule(text); });
    EXPECT_EQ(message.rfind("train.batch_schedule: ", 0), 0u) << text << ": " << message;
    EXPECT_NE(message.find(want), std::string::npos) << text << ": " << message;
  }
}

TEST(BatchSchedule, ValidateChecksTheFirstBatchAndTheLayout) {
  // Accepted: 8 = 2 x 4 at step 0; every batch divisible by dp x micro_batch = 2 x 2.
  const keel::Config ok = config_with("batch_schedule = 0:8;3:12;6:16\n", "dp = 2\n");
  EXPECT_EQ(keel::batch_at(keel::batch_stages(ok), 4), 12);

  std::string message = error_of([] { config_with("batch_schedule = 0:16;3:32\n"); });
  EXPECT_NE(message.find("invalid config: train.batch_schedule: the global batch at step 0 (16) must be "
                         "train.micro_batch x train.grad_accum (2 x 4 = 8)"),
            std::string::npos)
      << message;
  message = error_of([] { config_with("batch_schedule = 0:8;3:10\n", "dp = 2\n"); });
  EXPECT_NE(message.find("train.batch_schedule: the global batch from step 3 (10) must be divisible by parallel.dp "
                         "x the micro-batch of a rank (2 x 2 = 4)"),
            std::string::npos)
      << message;
  message = error_of([] { config_with("batch_schedule = 0:8;3:9\n"); });
  EXPECT_NE(message.find("from step 3 (9) must be divisible by parallel.dp x the micro-batch of a rank (1 x 2 = 2)"),
            std::string::npos)
      << message;
  message = error_of([] { config_with("batch_schedule = 0:8;3:x\n"); });
  EXPECT_EQ(message.rfind("invalid config: train.batch_schedule: ", 0), 0u) << message;
  // parallel.microbatches fixes a rank's micro-batch (8 / 1 / 2 = 4): a batch must divide into those.
  message = error_of([] { config_with("batch_schedule = 0:8;3:6\n", "microbatches = 2\n"); });
  EXPECT_NE(message.find("(1 x 4 = 4)"), std::string::npos) << message;
  // --set reaches it like any key.
  message = error_of([] { keel::parse_config_text("", "x.ini", {"train.batch_schedule=0:4;2:6"}); });
  EXPECT_NE(message.find("from step 2 (6) must be divisible"), std::string::npos) << message;
}

TEST(BatchSchedule, TheKeyIsWrittenOnlyWhenSetAndReadsBack) {
  const keel::Config plain = config_with("");
  const auto flat = keel::flatten(plain);
  EXPECT_TRUE(std::none_of(flat.begin(), flat.end(), [](const auto& kv) { return kv.first == "train.batch_schedule"; }))
      << "a config without the key writes none (config.ini and config hashes of existing runs unchanged)";
  EXPECT_EQ(keel::to_ini(plain).find("batch_schedule"), std::string::npos);
  EXPECT_EQ(keel::batch_stages(plain).size(), 1u);
  EXPECT_EQ(keel::batch_at(keel::batch_stages(plain), 1000), 8);

  const keel::Config scheduled = config_with("batch_schedule = 0:8;5:16\n");
  const std::string ini = keel::to_ini(scheduled);
  EXPECT_NE(ini.find("batch_schedule = 0:8;5:16"), std::string::npos) << ini;
  // [train] stays one section: the key follows the other train.* keys.
  EXPECT_LT(ini.find("batch_schedule"), ini.find("[optim]")) << ini;
  EXPECT_GT(ini.find("batch_schedule"), ini.find("[train]")) << ini;
  const keel::Config again = keel::parse_config_text(ini, "again.ini");
  EXPECT_EQ(keel::flatten(again), keel::flatten(scheduled));
  const auto keys = keel::documented_keys();
  EXPECT_TRUE(std::any_of(keys.begin(), keys.end(), [](const auto& kv) { return kv.first == "train.batch_schedule"; }));
}

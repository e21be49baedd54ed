// Why: `keel plan` is read by scripts (--json) and by people deciding on a layout; these drive the binary: the
// JSON contract, --nproc, and each bad input refused in one line with a non-zero exit.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "keel_process.h"

namespace {

using keel::testing::ProcessResult;
using keel::testing::run_keel;
using keel::testing::run_shell;

std::string k2() { return std::string(KEEL_SOURCE_DIR) + "/experiments/configs/k2-65b.ini"; }

TEST(PlanCommand, JsonHasTheContractFieldsAndNprocSetsDp) {
  // stdout alone: the JSON object (stderr is not mixed in).
  const ProcessResult r = run_shell(std::string(KEEL_BINARY) + " plan --config " + k2() + " --nproc 512 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = nlohmann::json::parse(r.output);
  EXPECT_NEAR(j["parameters"].get<double>() / 1e9, 65.29, 0.01);
  EXPECT_EQ(j["layout"]["dp"], 16);
  ASSERT_EQ(j["per_rank"].size(), 4u);
  for (const auto& s : j["per_rank"]) {
    for (const char* key : {"params_bytes", "optimizer_bytes", "activation_bytes", "total_bytes"})
      EXPECT_GT(s[key].get<double>(), 0.0) << key;
  }
  EXPECT_EQ(j["path"], "fused");
  EXPECT_EQ(run_keel("plan --config " + k2() + " --path reference --json").exit_code, 0);
}

TEST(PlanCommand, BadInputIsRefusedInOneLine) {
  struct Case {
    std::string arguments, expected;
  };
  const Case cases[] = {
      {"plan --config " + k2() + " --set parallel.tp=3", "model.heads (64) must be divisible by parallel.tp (3)"},
      {"plan --config " + k2() + " --nproc 100", "--nproc 100 is not a multiple of parallel.tp x parallel.pp = 32"},
      {"plan --config " + k2() + " --path gpu", "--path is 'gpu', expected fused or reference"},
      {"plan", "the option '--config' is required"},
  };
  for (const Case& c : cases) {
    const ProcessResult r = run_keel(c.arguments);
    EXPECT_NE(r.exit_code, 0) << c.arguments;
    EXPECT_NE(r.output.find(c.expected), std::string::npos) << c.arguments << "\n" << r.output;
  }
}

}  // namespace

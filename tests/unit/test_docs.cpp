// Why: users learn Keel from docs/, so a config key that docs/cli.md does not list is a defect. This keeps the
// key table in step with the code's key table.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/config/config.h"

TEST(Docs, CliReferenceListsEveryConfigKey) {
  std::ifstream in(std::string(KEEL_SOURCE_DIR) + "/docs/cli.md");
  ASSERT_TRUE(in) << "docs/cli.md missing";
  std::stringstream text;
  text << in.rdbuf();
  for (const auto& [key, doc] : keel::documented_keys()) {
    EXPECT_NE(text.str().find("`" + key + "`"), std::string::npos) << key << " is not documented in docs/cli.md";
  }
}

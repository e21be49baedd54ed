// Why: users learn Keel from docs/, so a config key that docs/cli.md does not list, a test file that
// docs/testing.md does not place, or a core folder that docs/architecture.md does not describe is a defect. These
// keep the three in step with the code.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/config/config.h"

namespace {

std::string read_doc(const std::string& relative) {
  std::ifstream in(std::string(KEEL_SOURCE_DIR) + "/" + relative);
  EXPECT_TRUE(in) << relative << " missing";
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

TEST(Docs, CliReferenceListsEveryConfigKey) {
  const std::string text = read_doc("docs/cli.md");
  for (const auto& [key, doc] : keel::documented_keys()) {
    EXPECT_NE(text.find("`" + key + "`"), std::string::npos) << key << " is not documented in docs/cli.md";
  }
}

// docs/testing.md's table "Where each test lives" names every test and fuzz source file.
TEST(Docs, TestingDocPlacesEveryTestFile) {
  namespace fs = std::filesystem;
  const std::string text = read_doc("docs/testing.md");
  int files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(std::string(KEEL_SOURCE_DIR) + "/tests")) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() != ".cpp" || (name.rfind("test_", 0) != 0 && name.rfind("fuzz_", 0) != 0)) continue;
    ++files;
    const std::string relative = fs::relative(entry.path(), KEEL_SOURCE_DIR).string();
    EXPECT_NE(text.find("`" + relative + "`"), std::string::npos) << relative << " is not listed in docs/testing.md";
  }
  EXPECT_GT(files, 50);
}

// docs/architecture.md's folder map names every folder of core/.
TEST(Docs, ArchitectureDocMapsEveryCoreFolder) {
  namespace fs = std::filesystem;
  const std::string text = read_doc("docs/architecture.md");
  for (const auto& entry : fs::directory_iterator(std::string(KEEL_SOURCE_DIR) + "/core")) {
    if (!entry.is_directory()) continue;
    const std::string folder = "core/" + entry.path().filename().string() + "/";
    EXPECT_NE(text.find(folder), std::string::npos) << folder << " is not in docs/architecture.md";
  }
}

// Why: docs/architecture.md states the dependency rule (plugins -> sdk <- core; cli -> everything; nothing -> cli),
// and an include that points the wrong way compiles fine, so only a test keeps the rule true. This scans every
// source file of the tree for the includes the rule forbids and names each offending file and line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

struct Rule {
  std::string folder;                  // files under this folder (relative to the source dir) ...
  std::string except;                  // ... apart from those under this one ("" for none) ...
  std::vector<std::string> forbidden;  // ... must not include a path starting with any of these
};

// "FILE:LINE: #include ..." for each include of a file under `rule.folder` that the rule forbids.
std::vector<std::string> violations(const Rule& rule) {
  std::vector<std::string> found;
  const fs::path root = fs::path(KEEL_SOURCE_DIR);
  for (const auto& entry : fs::recursive_directory_iterator(root / rule.folder)) {
    const std::string ext = entry.path().extension().string();
    if (!entry.is_regular_file() || (ext != ".h" && ext != ".cpp" && ext != ".cu" && ext != ".cuh")) continue;
    const std::string relative = fs::relative(entry.path(), root).string();
    if (!rule.except.empty() && relative.rfind(rule.except, 0) == 0) continue;
    std::ifstream in(entry.path());
    std::string line;
    for (int number = 1; std::getline(in, line); ++number) {
      if (line.rfind("#include \"", 0) != 0) continue;
      const std::string target = line.substr(10);
      for (const auto& prefix : rule.forbidden) {
        if (target.rfind(prefix, 0) == 0) found.push_back(relative + ":" + std::to_string(number) + ": " + line);
      }
    }
  }
  return found;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

TEST(DependencyRule, NothingOutsideTheCliIncludesIt) {
  for (const char* folder : {"core", "kernels", "sdk", "plugins", "tests"}) {
    const auto found = violations({folder, "core/cli/", {"core/cli/"}});
    EXPECT_TRUE(found.empty()) << joined(found);
  }
}

// kernels/ may include the build's generated settings ("keel/config.h"), never the SDK's header.
TEST(DependencyRule, KernelsKnowNeitherTheSdkNorTheCore) {
  const auto found = violations({"kernels", "", {"keel/plugin.h", "core/", "sdk/", "plugins/"}});
  EXPECT_TRUE(found.empty()) << joined(found);
}

// core/io/ is the bottom layer: it includes nothing else of Keel (so checkpoint and metrics can share it).
TEST(DependencyRule, IoIncludesNothingElseOfKeel) {
  std::vector<std::string> others = {"kernels/", "keel/plugin.h", "sdk/", "plugins/", "core/torch_compat.h"};
  for (const auto& entry : fs::directory_iterator(fs::path(KEEL_SOURCE_DIR) / "core")) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && name != "io") others.push_back("core/" + name + "/");
  }
  const auto found = violations({"core/io", "", others});
  EXPECT_TRUE(found.empty()) << joined(found);
}

TEST(DependencyRule, SdkAndPluginsIncludeNothingOfTheCore) {
  for (const char* folder : {"sdk", "plugins"}) {
    const auto found = violations({folder, "", {"core/", "kernels/", "plugins/"}});
    EXPECT_TRUE(found.empty()) << joined(found);
  }
}

TEST(DependencyRule, ParallelDoesNotDependOnTraining) {
  const auto found = violations({"core/parallel", "", {"core/train/", "core/cli/"}});
  EXPECT_TRUE(found.empty()) << joined(found);
}

// Interop and eval sit below training: the CLI claims run dirs for them (keel import-hf).
TEST(DependencyRule, InteropAndEvalDoNotDependOnTraining) {
  for (const char* folder : {"core/interop", "core/eval"}) {
    const auto found = violations({folder, "", {"core/train/", "core/cli/"}});
    EXPECT_TRUE(found.empty()) << joined(found);
  }
}

}  // namespace

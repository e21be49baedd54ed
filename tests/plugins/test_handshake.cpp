// Why: what every built-in plugin owes the host, checked for each: it loads through the real loader (API
// version, struct size, build fingerprint), names itself and the slots it fills as documented, accepts run
// config keys ("optim.*", "train.*") and refuses a mistyped --plugin-arg key by name.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <ostream>
#include <set>
#include <sstream>
#include <string>

#include "tests/plugins/plugin_test_support.h"

namespace keel::testing {
namespace {

struct BuiltinPlugin {
  std::string name;
  uint32_t slots;
  sdk::Args minimal_args;  // the fewest arguments it accepts
};

std::vector<BuiltinPlugin> builtin_plugins() {
  return {
      {"adamw", sdk::kOptimizer, {}},
      {"lion", sdk::kOptimizer, {}},
      {"zscore_skip", sdk::kSpikeHandler, {}},
      {"rollback_skip", sdk::kSpikeHandler, {}},
      {"lr_cooldown", sdk::kSpikeHandler, {}},
      {"embedding_grad_shrink", sdk::kGradTransform, {}},
      {"update_clip", sdk::kGradTransform, {}},
      {"static", sdk::kDataMixture, {{"weights", "prose=1"}}},
      {"staged", sdk::kDataMixture, {{"stages", "0:prose=1"}}},
      {"linear_ramp", sdk::kDataMixture, {{"from", "prose=1"}, {"to", "code=1"}, {"end_step", "10"}}},
      {"muon", sdk::kOptimizer, {}},
      {"moment_surgery", sdk::kSpikeHandler, {{"first", "0"}}},
  };
}

// Names the parameter in ctest's test names ("... # GetParam() = lion"), not its bytes.
void PrintTo(const BuiltinPlugin& plugin, std::ostream* os) { *os << plugin.name; }

class BuiltinPluginTest : public ::testing::TestWithParam<BuiltinPlugin> {};

TEST_P(BuiltinPluginTest, HandshakeNamesItselfAndItsSlot) {
  const BuiltinPlugin& expected = GetParam();
  const auto library = load_plugin_library(expected.name);
  EXPECT_EQ(library->description().name, expected.name);
  EXPECT_EQ(library->description().version, "1.0");
  EXPECT_EQ(library->description().slots, expected.slots);
  EXPECT_FALSE(library->description().description.empty());
  EXPECT_EQ(library->description().path, plugin_path(expected.name));
}

TEST_P(BuiltinPluginTest, CreatesWithMinimalArgsAndRunConfigKeys) {
  sdk::Args args = GetParam().minimal_args;
  args["optim.weight_decay"] = "0.05";
  args["train.steps"] = "100";
  EXPECT_NE(make_plugin(GetParam().name, args), nullptr);
}

TEST_P(BuiltinPluginTest, RefusesAnUnknownArgumentNamingIt) {
  sdk::Args args = GetParam().minimal_args;
  args["bogus_key"] = "1";
  const std::string refusal = refusal_of(GetParam().name, args);
  EXPECT_NE(refusal.find("refused its arguments"), std::string::npos) << refusal;
  EXPECT_NE(refusal.find("unknown plugin argument 'bogus_key'"), std::string::npos) << refusal;
}

// The arguments docs/plugins.md lists for `plugin` under "## Built-in plugins": the first cell of each table row
// ("| `key` | default | meaning |") below the heading "### `plugin`", up to the next heading.
std::set<std::string> documented_arguments(const std::string& plugin, bool& has_section) {
  std::ifstream in(std::string(KEEL_SOURCE_DIR) + "/docs/plugins.md");
  std::set<std::string> out;
  std::string line;
  bool in_reference = false, in_plugin = false;
  has_section = false;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) in_reference = line == "## Built-in plugins";
    if (!in_reference) continue;
    if (line.rfind("### ", 0) == 0) {
      in_plugin = line.rfind("### `" + plugin + "`", 0) == 0;
      has_section = has_section || in_plugin;
    }
    if (in_plugin && line.rfind("| `", 0) == 0) out.insert(line.substr(3, line.find('`', 3) - 3));
  }
  return out;
}

// The arguments the plugin itself accepts: require_known_args lists them in its refusal of an unknown key.
std::set<std::string> accepted_arguments(const BuiltinPlugin& plugin) {
  sdk::Args args = plugin.minimal_args;
  args["bogus_key"] = "1";
  const std::string refusal = refusal_of(plugin.name, args);
  const size_t at = refusal.find("(known: ");
  if (at == std::string::npos) return {"(no list in: " + refusal + ")"};
  const std::string list = refusal.substr(at + 8, refusal.find(')', at) - at - 8);
  std::set<std::string> out;
  if (list == "none") return out;
  std::stringstream items(list);
  for (std::string item; std::getline(items, item, ',');) out.insert(item.substr(item.find_first_not_of(' ')));
  return out;
}

TEST_P(BuiltinPluginTest, DocsListExactlyItsArguments) {
  bool has_section = false;
  const std::set<std::string> documented = documented_arguments(GetParam().name, has_section);
  EXPECT_TRUE(has_section) << "docs/plugins.md has no '### `" << GetParam().name << "`' under '## Built-in plugins'";
  EXPECT_EQ(documented, accepted_arguments(GetParam())) << "docs/plugins.md vs what " << GetParam().name << " accepts";
}

INSTANTIATE_TEST_SUITE_P(AllBuiltins, BuiltinPluginTest, ::testing::ValuesIn(builtin_plugins()),
                         [](const ::testing::TestParamInfo<BuiltinPlugin>& info) { return info.param.name; });

TEST(PluginLoading, EveryBuiltPluginIsInThisTable) {
  // A new plugin folder must be added to builtin_plugins() above, so that it is handshake- and argument-checked.
  std::set<std::string> built, listed;
  for (const auto& item : std::filesystem::directory_iterator(KEEL_PLUGIN_DIR)) {
    const std::string file = item.path().filename().string();
    if (file.rfind("keel_plugin_", 0) == 0 && item.path().extension() == ".so") {
      built.insert(item.path().stem().string().substr(std::string("keel_plugin_").size()));
    }
  }
  for (const auto& plugin : builtin_plugins()) listed.insert(plugin.name);
  EXPECT_EQ(built, listed);
}

}  // namespace
}  // namespace keel::testing

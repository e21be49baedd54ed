// Why: loading code someone else compiled is the riskiest thing Keel does. This is the one place that opens a
// plugin library (Boost.DLL), checks the handshake in the safe order (entry point present -> API version ->
// struct size -> build fingerprint, before any C++ type from the library is used), refuses a mismatch with both
// sides printed, and ties every plugin object to its library so the library stays loaded until the last
// object is gone. After the handshake it looks up the one optional entry point, keel_plugin_warm_start (a plugin
// without it loads as before). It also finds plugins by name (KEEL_PLUGIN_PATH, then next to the keel binary).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "keel/plugin.h"

namespace keel::plugin_host {

class PluginError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct PluginDescription {
  std::string name;
  std::string version;
  std::string description;
  std::string path;
  uint32_t slots = 0;
  bool warm_start = false;  // exports the optional keel_plugin_warm_start (KEEL_PLUGIN_WARM_START)
};

class PluginLibrary {
 public:
  // Loads and checks `path`. Throws PluginError naming the file: not loadable, not a Keel plugin (no
  // keel_plugin_info), another API version, a struct of another size, or another build fingerprint.
  static std::shared_ptr<PluginLibrary> load(const std::string& path);
  ~PluginLibrary();

  const PluginDescription& description() const { return description_; }
  // A new plugin object; it keeps this library loaded for as long as it lives. Throws PluginError with the
  // plugin's own message if its constructor refuses the arguments.
  std::shared_ptr<sdk::Plugin> create(const sdk::Args& args) const;
  // Hands `history` to `object`, which this library created, through the optional warm-start entry point.
  // Throws PluginError naming the plugin if it has none or if it reports an error.
  sdk::WarmStartResult warm_start(sdk::Plugin& object, const sdk::WarmStartHistory& history) const;

 private:
  PluginLibrary() = default;
  struct Impl;
  std::shared_ptr<Impl> impl_;
  PluginDescription description_;
};

// Directories searched for plugins by name, in order: each entry of $KEEL_PLUGIN_PATH, then
// <dir of the keel binary>/../lib/keel/plugins, then this build's plugin directory.
std::vector<std::string> plugin_search_dirs();
// The file for a built-in name ("lion" -> .../keel_plugin_lion.so) or the path itself if it contains a '/' or
// ends in ".so". Throws PluginError listing where it looked.
std::string resolve_plugin_path(const std::string& name_or_path);
// Every keel_plugin_*.so in the search directories, loaded and checked (entries that fail carry the error).
struct FoundPlugin {
  std::string path;
  PluginDescription description;
  std::string error;  // empty when the plugin loads
};
std::vector<FoundPlugin> discover_plugins();
// "optimizer,spike_handler"
std::string slot_names(uint32_t slots);
// "optimizer" -> sdk::kOptimizer; throws PluginError for an unknown slot name.
sdk::Slot parse_slot(const std::string& name);

}  // namespace keel::plugin_host

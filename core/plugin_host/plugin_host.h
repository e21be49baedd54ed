// Why: the run's plugins, slot by slot, built from the config (plugins.* keys and [plugin.NAME] arguments):
// exactly one optimizer, at most one lr_schedule, spike_handler and data_mixture, a chain of grad_transforms
// and any number of observers. The trainer asks the host for the plugin of a slot at each hook; checkpoints
// save each plugin's state under its slot and name; a swap loads the new plugin first and only then replaces
// the old one, so a refused plugin leaves the run as it was. Each loaded plugin carries its library's absolute
// path and SHA-256, which the lineage and every checkpoint record.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/plugin_host/plugin_library.h"

namespace keel::plugin_host {

struct LoadedPlugin {
  std::string slot;  // "optimizer", "grad_transform", ...
  std::string spec;  // what the config named: a built-in name or a path
  PluginDescription description;
  std::string sha256;  // SHA-256 of the library file when it was loaded (lower-case hex)
  std::shared_ptr<PluginLibrary> library;
  std::shared_ptr<sdk::Plugin> object;
  const std::string& name() const { return description.name; }
};

// The arguments plugin `name` gets: the resolved run config (its own keys) plus plugin.NAME.* without prefix.
sdk::Args plugin_args(const Config& config, const std::string& name);
// Comma-separated list -> entries (spaces trimmed, empties dropped).
std::vector<std::string> split_plugin_list(const std::string& list);

class PluginHost {
 public:
  // Loads every plugin the config names. Throws PluginError naming the slot and plugin on any refusal.
  explicit PluginHost(const Config& config);

  LoadedPlugin& optimizer() { return optimizer_; }
  LoadedPlugin* lr_schedule() { return single(lr_schedule_); }
  LoadedPlugin* spike_handler() { return single(spike_handler_); }
  LoadedPlugin* data_mixture() { return single(data_mixture_); }
  std::vector<LoadedPlugin>& grad_transforms() { return grad_transforms_; }
  std::vector<LoadedPlugin>& observers() { return observers_; }
  // Every loaded plugin, in hook order (optimizer, lr_schedule, spike_handler, grad_transforms, data_mixture,
  // observers).
  std::vector<LoadedPlugin*> all();

  // Loads the plugin(s) the config names for `slot` (a list for grad_transform/observers). Nothing changes in
  // the host until replace() is called with the result.
  static std::vector<LoadedPlugin> load_slot(const std::string& slot, const Config& config);
  void replace(const std::string& slot, std::vector<LoadedPlugin> plugins);

 private:
  static LoadedPlugin* single(std::vector<LoadedPlugin>& v) { return v.empty() ? nullptr : &v.front(); }
  LoadedPlugin optimizer_;
  std::vector<LoadedPlugin> lr_schedule_, spike_handler_, data_mixture_, grad_transforms_, observers_;
};

}  // namespace keel::plugin_host

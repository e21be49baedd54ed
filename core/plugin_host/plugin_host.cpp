// Why: see plugin_host.h.
#include "core/plugin_host/plugin_host.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "core/checkpoint/sha256.h"
#include "core/plugin_host/slots.h"

namespace keel::plugin_host {
namespace {

const std::string& slot_spec(const Config& config, const std::string& slot) {
  return config.plugins.*slot_info(slot).field;
}

}  // namespace

std::vector<std::string> split_plugin_list(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string item = list.substr(start, end - start);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) out.push_back(item);
    start = end + 1;
  }
  return out;
}

sdk::Args plugin_args(const Config& config, const std::string& name) {
  sdk::Args args;
  for (const auto& [key, value] : flatten(config)) {
    if (key.rfind("plugin.", 0) != 0) args[key] = value;
  }
  const auto it = config.plugin_args.find(name);
  if (it != config.plugin_args.end()) {
    for (const auto& [key, value] : it->second) args[key] = value;
  }
  return args;
}

std::vector<LoadedPlugin> PluginHost::load_slot(const std::string& slot, const Config& config) {
  const sdk::Slot bit = parse_slot(slot);
  const std::vector<std::string> specs = split_plugin_list(slot_spec(config, slot));
  const bool chain = slot_info(slot).chain;
  if (!chain && specs.size() > 1)
    throw PluginError("plugins." + slot + " takes one plugin, got '" + slot_spec(config, slot) + "'");
  std::vector<LoadedPlugin> out;
  for (const auto& spec : specs) {
    LoadedPlugin loaded;
    loaded.slot = slot;
    loaded.spec = spec;
    std::shared_ptr<PluginLibrary> library;
    try {
      // The absolute path: what the lineage records and what a later resume compares the file at.
      std::error_code ec;
      const std::string resolved = resolve_plugin_path(spec);
      const std::filesystem::path absolute = std::filesystem::absolute(resolved, ec);
      const std::string path = ec ? resolved : absolute.lexically_normal().string();
      library = PluginLibrary::load(path);
      loaded.sha256 = checkpoint::sha256_file(path);
    } catch (const std::exception& e) {
      throw PluginError("plugins." + slot + " = " + spec + ": " + e.what());
    }
    loaded.description = library->description();
    loaded.library = library;
    if ((loaded.description.slots & bit) == 0) {
      throw PluginError("plugins." + slot + " = " + spec + ": plugin '" + loaded.description.name + "' fills " +
                        slot_names(loaded.description.slots) + ", not " + slot);
    }
    loaded.object = library->create(plugin_args(config, loaded.description.name));
    spdlog::info("plugin {} {} ({}) in slot {}", loaded.description.name, loaded.description.version,
                 loaded.description.path, slot);
    out.push_back(std::move(loaded));
  }
  return out;
}

PluginHost::PluginHost(const Config& config) {
  std::vector<LoadedPlugin> optimizer = load_slot("optimizer", config);
  if (optimizer.size() != 1) throw PluginError("plugins.optimizer must name exactly one optimizer plugin");
  optimizer_ = std::move(optimizer.front());
  lr_schedule_ = load_slot("lr_schedule", config);
  spike_handler_ = load_slot("spike_handler", config);
  grad_transforms_ = load_slot("grad_transform", config);
  data_mixture_ = load_slot("data_mixture", config);
  observers_ = load_slot("observers", config);
  // Arguments for a plugin that is not loaded are most likely a typo: say so (they are kept in the config).
  std::vector<std::string> loaded_names;
  for (auto* p : all()) loaded_names.push_back(p->name());
  for (const auto& [name, args] : config.plugin_args) {
    if (std::find(loaded_names.begin(), loaded_names.end(), name) == loaded_names.end())
      spdlog::warn("plugin.{}.* arguments are set but no plugin named '{}' is loaded", name, name);
  }
}

std::vector<LoadedPlugin*> PluginHost::all() {
  std::vector<LoadedPlugin*> out{&optimizer_};
  for (auto* group : {&lr_schedule_, &spike_handler_, &grad_transforms_, &data_mixture_, &observers_}) {
    for (auto& p : *group) out.push_back(&p);
  }
  return out;
}

void PluginHost::replace(const std::string& slot, std::vector<LoadedPlugin> plugins) {
  switch (slot_info(slot).bit) {  // throws naming the known slots
    case sdk::kOptimizer:
      if (plugins.size() != 1) throw PluginError("the optimizer slot takes exactly one plugin");
      optimizer_ = std::move(plugins.front());
      return;
    case sdk::kLrSchedule:
      lr_schedule_ = std::move(plugins);
      return;
    case sdk::kSpikeHandler:
      spike_handler_ = std::move(plugins);
      return;
    case sdk::kGradTransform:
      grad_transforms_ = std::move(plugins);
      return;
    case sdk::kDataMixture:
      data_mixture_ = std::move(plugins);
      return;
    case sdk::kObserver:
      observers_ = std::move(plugins);
      return;
  }
}

}  // namespace keel::plugin_host

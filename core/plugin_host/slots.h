// Why: the one table of plugin slots. Each slot's SDK bit, its name (the config key plugins.NAME, `--plugin
// NAME=...`, `keel control` requests, checkpoint and lineage records), whether it takes a chain of plugins, and
// the config field that names them live here and nowhere else; everything that needs one of these asks.
#pragma once

#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/plugin_host/plugin_library.h"

namespace keel::plugin_host {

struct SlotInfo {
  sdk::Slot bit;
  const char* name;                   // "optimizer", "grad_transform", "observers", ...
  bool chain;                         // several plugins, comma-separated, called in order
  std::string PluginsConfig::*field;  // the plugins.NAME value
};

// Every slot, in the SDK's bit order.
const std::vector<SlotInfo>& slot_table();
// The slot called `name`; throws PluginError naming the known slots.
const SlotInfo& slot_info(const std::string& name);

}  // namespace keel::plugin_host

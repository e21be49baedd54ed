// Why: a plugin from the future: its handshake says API version 999. Keel must refuse it, naming both versions.
#include "keel/plugin.h"

extern "C" __attribute__((visibility("default"))) const keel::sdk::PluginInfo* keel_plugin_info() {
  static keel::sdk::PluginInfo info{};
  info.api_version = 999;
  info.struct_size = sizeof(info);
  return &info;
}

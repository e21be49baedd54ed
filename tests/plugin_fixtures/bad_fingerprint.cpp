// Why: a plugin built against another LibTorch: right API version and size, wrong fingerprint. Keel must refuse
// it and print both fingerprints.
#include "keel/plugin.h"

namespace {
class Nothing : public keel::sdk::Plugin {
 public:
  explicit Nothing(const keel::sdk::Args&) {}
};
keel::sdk::Plugin* create(const keel::sdk::Args* args, char*, size_t) { return new Nothing(*args); }
void destroy(keel::sdk::Plugin* p) { delete p; }
}  // namespace

extern "C" __attribute__((visibility("default"))) const keel::sdk::PluginInfo* keel_plugin_info() {
  static keel::sdk::PluginInfo info = [] {
    keel::sdk::PluginInfo i{};
    i.api_version = keel::sdk::kApiVersion;
    i.struct_size = sizeof(keel::sdk::PluginInfo);
    i.fingerprint = keel::sdk::build_fingerprint();
    std::snprintf(i.fingerprint.torch_version, sizeof(i.fingerprint.torch_version), "0.4.1");
    i.name = "bad_fingerprint";
    i.version = "1.0";
    i.description = "built with another LibTorch";
    i.slots = keel::sdk::kObserver;
    i.create = &create;
    i.destroy = &destroy;
    return i;
  }();
  return &info;
}

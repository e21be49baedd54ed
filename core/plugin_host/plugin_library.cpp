// Why: see plugin_library.h.
#include "core/plugin_host/plugin_library.h"

#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/plugin_host/slots.h"
#include "keel/config.h"

namespace keel::plugin_host {
namespace fs = std::filesystem;

namespace {

constexpr const char* kEntryPoint = "keel_plugin_info";
constexpr const char* kWarmStartEntryPoint = "keel_plugin_warm_start";  // optional, looked up after the handshake
constexpr const char* kFilePrefix = "keel_plugin_";

std::string fingerprint_text(const sdk::BuildFingerprint& f) {
  return std::string("SDK ") + std::string(f.sdk_version, strnlen(f.sdk_version, sizeof(f.sdk_version))) +
         ", LibTorch " + std::string(f.torch_version, strnlen(f.torch_version, sizeof(f.torch_version))) +
         ", _GLIBCXX_USE_CXX11_ABI=" + std::to_string(f.cxx11_abi) + ", " +
         std::string(f.compiler, strnlen(f.compiler, sizeof(f.compiler)));
}

}  // namespace

struct PluginLibrary::Impl {
  boost::dll::shared_library library;
  const sdk::PluginInfo* info = nullptr;
  sdk::WarmStartFn warm_start = nullptr;
};

PluginLibrary::~PluginLibrary() = default;

std::shared_ptr<PluginLibrary> PluginLibrary::load(const std::string& path) {
  if (!fs::exists(path)) throw PluginError("plugin " + path + ": no such file");
  auto impl = std::make_shared<Impl>();
  try {
    impl->library.load(path, boost::dll::load_mode::rtld_lazy | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    throw PluginError("plugin " + path + ": cannot be loaded as a shared library (" + e.what() + ")");
  }
  if (!impl->library.has(kEntryPoint)) {
    throw PluginError("plugin " + path + ": not a Keel plugin (it does not export " + kEntryPoint + ")");
  }
  using InfoFn = const sdk::PluginInfo* (*)();
  const InfoFn entry = impl->library.get<const sdk::PluginInfo*()>(kEntryPoint);
  const sdk::PluginInfo* info = entry();
  if (info == nullptr) throw PluginError("plugin " + path + ": " + kEntryPoint + "() returned null");
  // Plain fields first, in this order: nothing beyond what the version and size vouch for is read before.
  uint32_t api_version = 0;
  std::memcpy(&api_version, info, sizeof(api_version));
  if (api_version != sdk::kApiVersion) {
    throw PluginError("plugin " + path + ": built for plugin API version " + std::to_string(api_version) +
                      ", this Keel speaks version " + std::to_string(sdk::kApiVersion) +
                      ": rebuild it against this SDK");
  }
  if (info->struct_size != sizeof(sdk::PluginInfo)) {
    throw PluginError("plugin " + path + ": handshake struct is " + std::to_string(info->struct_size) +
                      " bytes, this Keel expects " + std::to_string(sizeof(sdk::PluginInfo)));
  }
  const sdk::BuildFingerprint mine = sdk::build_fingerprint();
  if (fingerprint_text(info->fingerprint) != fingerprint_text(mine)) {
    throw PluginError("plugin " + path +
                      ": built with a different toolchain:\n  plugin: " + fingerprint_text(info->fingerprint) +
                      "\n  keel:   " + fingerprint_text(mine) + "\nrebuild the plugin against this Keel's SDK");
  }
  if (info->name == nullptr || info->version == nullptr || info->create == nullptr || info->destroy == nullptr) {
    throw PluginError("plugin " + path + ": handshake has a null name, version or factory");
  }
  if (info->slots == 0 || (info->slots & ~uint32_t{(1u << slot_table().size()) - 1}) != 0) {
    throw PluginError("plugin " + path + ": declares no known slot (slots = " + std::to_string(info->slots) + ")");
  }
  impl->info = info;
  // The optional warm-start entry point (plugin.h): only now, once the handshake vouches for the library's ABI.
  if (impl->library.has(kWarmStartEntryPoint))
    impl->warm_start =
        impl->library.get<int(sdk::Plugin*, const sdk::WarmStartHistory*, sdk::WarmStartResult*, char*, size_t)>(
            kWarmStartEntryPoint);
  std::shared_ptr<PluginLibrary> out(new PluginLibrary());
  out->impl_ = std::move(impl);
  out->description_ = {info->name, info->version, info->description ? info->description : "",
                       path,       info->slots,   out->impl_->warm_start != nullptr};
  return out;
}

std::shared_ptr<sdk::Plugin> PluginLibrary::create(const sdk::Args& args) const {
  char error[1024] = {0};
  sdk::Plugin* object = impl_->info->create(&args, error, sizeof(error));
  if (object == nullptr) {
    throw PluginError("plugin " + description_.name + " (" + description_.path +
                      ") refused its arguments: " + (error[0] ? std::string(error) : std::string("no reason given")));
  }
  // The deleter owns a reference to the library: it is unloaded only after the last object is destroyed.
  std::shared_ptr<Impl> keep_loaded = impl_;
  return std::shared_ptr<sdk::Plugin>(object, [keep_loaded](sdk::Plugin* p) { keep_loaded->info->destroy(p); });
}

sdk::WarmStartResult PluginLibrary::warm_start(sdk::Plugin& object, const sdk::WarmStartHistory& history) const {
  if (impl_->warm_start == nullptr)
    throw PluginError("plugin " + description_.name + " (" + description_.path + ") has no warm-start entry point");
  char error[1024] = {0};
  sdk::WarmStartResult result;
  if (impl_->warm_start(&object, &history, &result, error, sizeof(error)) != 0) {
    throw PluginError("plugin " + description_.name + " (" + description_.path + ") failed to warm start from " +
                      std::to_string(history.rows.size()) +
                      " rows: " + (error[0] ? std::string(error) : std::string("no reason given")));
  }
  return result;
}

std::vector<std::string> plugin_search_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("KEEL_PLUGIN_PATH")) {
    std::string list = env;
    size_t start = 0;
    while (start <= list.size()) {
      const size_t end = list.find(':', start);
      const std::string dir = list.substr(start, end == std::string::npos ? std::string::npos : end - start);
      if (!dir.empty()) dirs.push_back(dir);
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }
  try {
    dirs.push_back((boost::dll::program_location().parent_path().parent_path() / "lib" / "keel" / "plugins").string());
  } catch (const std::exception&) {
  }
  dirs.push_back(KEEL_BUILD_PLUGIN_DIR);  // this build tree's plugins (keel/config.h), for tests run from anywhere
  std::vector<std::string> unique;
  std::set<std::string> seen;
  for (const auto& dir : dirs) {
    std::error_code ec;
    const std::string key = fs::weakly_canonical(dir, ec).string();
    if (seen.insert(ec ? dir : key).second) unique.push_back(dir);
  }
  return unique;
}

std::string resolve_plugin_path(const std::string& name_or_path) {
  if (name_or_path.empty()) throw PluginError("empty plugin name");
  const bool is_path = name_or_path.find('/') != std::string::npos ||
                       (name_or_path.size() > 3 && name_or_path.compare(name_or_path.size() - 3, 3, ".so") == 0);
  if (is_path) {
    if (!fs::exists(name_or_path)) throw PluginError("plugin " + name_or_path + ": no such file");
    return name_or_path;
  }
  std::string looked;
  for (const auto& dir : plugin_search_dirs()) {
    const std::string candidate = dir + "/" + kFilePrefix + name_or_path + ".so";
    if (fs::exists(candidate)) return candidate;
    looked += "\n  " + candidate;
  }
  throw PluginError("no plugin named '" + name_or_path + "' (`keel plugins` lists them); looked for:" + looked);
}

std::vector<FoundPlugin> discover_plugins() {
  std::vector<FoundPlugin> out;
  std::set<std::string> seen_names;
  for (const auto& dir : plugin_search_dirs()) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<std::string> files;
    for (const auto& item : fs::directory_iterator(dir, ec)) {
      const std::string name = item.path().filename().string();
      if (name.rfind(kFilePrefix, 0) == 0 && item.path().extension() == ".so") files.push_back(item.path().string());
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      const std::string short_name = fs::path(file).stem().string().substr(std::strlen(kFilePrefix));
      if (!seen_names.insert(short_name).second) continue;  // an earlier directory wins, as in resolve_plugin_path
      FoundPlugin found;
      found.path = file;
      try {
        found.description = PluginLibrary::load(file)->description();
      } catch (const PluginError& e) {
        found.error = e.what();
      }
      out.push_back(std::move(found));
    }
  }
  return out;
}

const std::vector<SlotInfo>& slot_table() {
  static const std::vector<SlotInfo> table = {
      {sdk::kOptimizer, "optimizer", false, &PluginsConfig::optimizer},
      {sdk::kLrSchedule, "lr_schedule", false, &PluginsConfig::lr_schedule},
      {sdk::kSpikeHandler, "spike_handler", false, &PluginsConfig::spike_handler},
      {sdk::kGradTransform, "grad_transform", true, &PluginsConfig::grad_transform},
      {sdk::kDataMixture, "data_mixture", false, &PluginsConfig::data_mixture},
      {sdk::kObserver, "observers", true, &PluginsConfig::observers}};
  return table;
}

const SlotInfo& slot_info(const std::string& name) {
  for (const auto& slot : slot_table()) {
    if (slot.name == name) return slot;
  }
  std::string known;
  for (const auto& slot : slot_table()) known += (known.empty() ? "" : ", ") + std::string(slot.name);
  throw PluginError("unknown plugin slot '" + name + "' (slots: " + known + ")");
}

std::string slot_names(uint32_t slots) {
  std::string out;
  for (const auto& slot : slot_table()) {
    if (slots & slot.bit) out += (out.empty() ? "" : ",") + std::string(slot.name);
  }
  return out;
}

sdk::Slot parse_slot(const std::string& name) { return slot_info(name).bit; }

}  // namespace keel::plugin_host

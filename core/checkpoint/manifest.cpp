// Why: see manifest.h.
#include "core/checkpoint/manifest.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/json_fields.h"
#include "core/checkpoint/sha256.h"

namespace keel::checkpoint {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

[[noreturn]] void bad_field(const std::string& origin, const std::string& field, const std::string& what) {
  throw CheckpointError(origin + ": manifest field '" + field + "' " + what);
}

const json& field(const json& object, const char* name, const std::string& path, const std::string& origin) {
  if (!object.is_object()) bad_field(origin, path, "is not an object");
  const auto it = object.find(name);
  if (it == object.end()) bad_field(origin, path.empty() ? name : path + "." + name, "is missing");
  return *it;
}

std::string string_field(const json& object, const char* name, const std::string& origin,
                         const std::string& path = "") {
  const json& v = field(object, name, path, origin);
  if (!v.is_string())
    bad_field(origin, path.empty() ? name : path + "." + name, "must be a string, got " + describe_json_value(v));
  return v.get<std::string>();
}

int64_t int_field(const json& object, const char* name, const std::string& origin, int64_t min, int64_t max,
                  const std::string& path = "") {
  const json& v = field(object, name, path, origin);
  const std::string full = path.empty() ? name : path + "." + name;
  if (!v.is_number_integer()) bad_field(origin, full, "must be an integer, got " + describe_json_value(v));
  const int64_t x = v.get<int64_t>();
  if (x < min || x > max)
    bad_field(origin, full,
              "= " + std::to_string(x) + " is out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  return x;
}

bool is_plain_file_name(const std::string& name) {
  if (name.empty() || name.size() > 255 || name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

bool is_hex_sha256(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

const ManifestFile* Manifest::rank_file(int64_t rank) const {
  for (const auto& f : files) {
    if (f.rank == rank) return &f;
  }
  return nullptr;
}

std::string rank_file_name(int64_t rank) {
  char name[32];
  std::snprintf(name, sizeof(name), "rank-%05lld.h5", static_cast<long long>(rank));
  return name;
}

std::string manifest_to_json(const Manifest& m) {
  json files = json::array();
  for (const auto& f : m.files)
    files.push_back({{"name", f.name}, {"rank", f.rank}, {"bytes", f.bytes}, {"sha256", f.sha256}});
  json model = json::object();
  for (const auto& [k, v] : m.model) model[k] = v;
  const json out = {
      {"format", "keel-checkpoint"},
      {"format_version", m.format_version},
      {"keel_version", m.keel_version},
      {"step", m.step},
      {"created", m.created},
      {"run_id", m.run_id},
      {"layout",
       {{"dp", m.layout.dp}, {"tp", m.layout.tp}, {"pp", m.layout.pp}, {"world_size", m.layout.world_size()}}},
      {"config_hash", m.config_hash},
      {"model", model},
      {"data_fingerprint", json::parse(m.data_fingerprint.empty() ? "{}" : m.data_fingerprint)},
      {"lineage", json::parse(m.lineage.empty() ? "{}" : m.lineage)},
      {"files", files}};
  json with_flags = out;
  if (m.tensors_finite) with_flags["tensors_finite"] = *m.tensors_finite;
  return with_flags.dump(2) + "\n";
}

Manifest parse_manifest(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw CheckpointError(origin + ": manifest is not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw CheckpointError(origin + ": manifest is not a JSON object");
  Manifest m;
  if (string_field(j, "format", origin) != "keel-checkpoint") bad_field(origin, "format", "is not \"keel-checkpoint\"");
  m.format_version = static_cast<int>(int_field(j, "format_version", origin, 1, 1 << 20));
  if (m.format_version != kCheckpointFormatVersion) {
    bad_field(origin, "format_version",
              "= " + std::to_string(m.format_version) + ", this Keel reads version " +
                  std::to_string(kCheckpointFormatVersion));
  }
  m.keel_version = string_field(j, "keel_version", origin);
  m.step = int_field(j, "step", origin, 0, INT64_MAX / 2);
  m.created = string_field(j, "created", origin);
  m.run_id = string_field(j, "run_id", origin);
  const json& layout = field(j, "layout", "", origin);
  m.layout.dp = int_field(layout, "dp", origin, 1, 1 << 20, "layout");
  m.layout.tp = int_field(layout, "tp", origin, 1, 1 << 20, "layout");
  m.layout.pp = int_field(layout, "pp", origin, 1, 1 << 20, "layout");
  const int64_t world = int_field(layout, "world_size", origin, 1, 1 << 20, "layout");
  if (world != m.layout.world_size()) bad_field(origin, "layout.world_size", "is not dp * tp * pp");
  m.config_hash = string_field(j, "config_hash", origin);
  if (!is_hex_sha256(m.config_hash)) bad_field(origin, "config_hash", "is not a SHA-256 hex digest");
  const json& model = field(j, "model", "", origin);
  if (!model.is_object()) bad_field(origin, "model", "must be an object");
  for (const auto& [k, v] : model.items()) {
    if (!v.is_string()) bad_field(origin, "model." + k, "must be a string, got " + describe_json_value(v));
    m.model[k] = v.get<std::string>();
  }
  const json& data = field(j, "data_fingerprint", "", origin);
  if (!data.is_object()) bad_field(origin, "data_fingerprint", "must be an object");
  m.data_fingerprint = data.dump();
  const json& lineage = field(j, "lineage", "", origin);
  if (!lineage.is_object()) bad_field(origin, "lineage", "must be an object");
  m.lineage = lineage.dump();

  const json& files = field(j, "files", "", origin);
  if (!files.is_array() || files.empty()) bad_field(origin, "files", "must be a non-empty array");
  std::set<std::string> names;
  std::set<int64_t> ranks;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string path = "files[" + std::to_string(i) + "]";
    ManifestFile f;
    f.name = string_field(files[i], "name", origin, path);
    if (!is_plain_file_name(f.name) || f.name == kManifestName)
      bad_field(origin, path + ".name", "= \"" + f.name + "\" is not a plain file name inside the checkpoint");
    if (!names.insert(f.name).second) bad_field(origin, path + ".name", "= \"" + f.name + "\" is listed twice");
    f.rank = int_field(files[i], "rank", origin, -1, world - 1, path);
    if (f.rank >= 0) {
      if (!ranks.insert(f.rank).second)
        bad_field(origin, path + ".rank", "= " + std::to_string(f.rank) + " is listed twice");
      if (f.name != rank_file_name(f.rank)) bad_field(origin, path + ".name", "must be " + rank_file_name(f.rank));
    }
    f.bytes = int_field(files[i], "bytes", origin, 0, INT64_MAX / 2, path);
    f.sha256 = string_field(files[i], "sha256", origin, path);
    if (!is_hex_sha256(f.sha256)) bad_field(origin, path + ".sha256", "is not a SHA-256 hex digest");
    m.files.push_back(std::move(f));
  }
  if (static_cast<int64_t>(ranks.size()) != world) {
    int64_t missing = 0;
    while (ranks.count(missing)) ++missing;
    bad_field(origin, "files",
              "lists " + std::to_string(ranks.size()) + " rank files for world size " + std::to_string(world) + ": " +
                  rank_file_name(missing) + " is not listed");
  }
  if (const auto it = j.find("tensors_finite"); it != j.end()) {
    if (!it->is_boolean())
      bad_field(origin, "tensors_finite", "must be true or false, got " + describe_json_value(*it));
    m.tensors_finite = it->get<bool>();
  }
  return m;
}

Manifest verify_checkpoint_dir(const std::string& dir) {
  const std::string manifest_path = dir + "/" + kManifestName;
  if (!fs::exists(manifest_path)) throw CheckpointError(dir + ": incomplete checkpoint (no " + kManifestName + ")");
  Manifest m = parse_manifest(read_small_file(manifest_path), manifest_path);
  // The name of a step-N directory is what `--from` and retention go by: it must be the step inside.
  const std::string dir_name = fs::path(dir).lexically_normal().filename().string();
  if (const auto named = parse_step_dir_name(dir_name); named && *named != m.step) {
    throw CheckpointError(dir + ": the directory is named for step " + std::to_string(*named) + " but its " +
                          kManifestName + " says step " + std::to_string(m.step) + " (files of another checkpoint?)");
  }
  // Every file is listed (so checksummed), and what a resume reads is listed: config.ini and every rank file.
  const ManifestFile* config = nullptr;
  std::set<std::string> listed;
  for (const auto& f : m.files) {
    listed.insert(f.name);
    if (f.name == kConfigName) config = &f;
  }
  if (config == nullptr) {
    throw CheckpointError(dir + "/" + kConfigName + ": not listed in " + kManifestName +
                          " (every file of a checkpoint must be listed with its SHA-256)");
  }
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name != kManifestName && !listed.count(name)) {
      throw CheckpointError(dir + "/" + name + ": present but not listed in " + kManifestName +
                            " (every file of a checkpoint must be listed with its SHA-256)");
    }
  }
  if (ec) throw CheckpointError(dir + ": cannot list the directory: " + ec.message());
  for (const auto& f : m.files) {
    const std::string path = dir + "/" + f.name;
    const auto size = fs::file_size(path, ec);
    if (ec) throw CheckpointError(path + ": listed in the manifest but missing (" + ec.message() + ")");
    if (static_cast<int64_t>(size) != f.bytes) {
      throw CheckpointError(path + ": truncated or changed: " + std::to_string(size) + " bytes, manifest says " +
                            std::to_string(f.bytes));
    }
    const std::string sha = sha256_file(path);
    if (sha != f.sha256)
      throw CheckpointError(path + ": corrupted: SHA-256 " + sha + " does not match the manifest's " + f.sha256);
  }
  if (config->sha256 != m.config_hash) {
    throw CheckpointError(dir + "/" + kConfigName + ": SHA-256 " + config->sha256 +
                          " does not match the manifest's config_hash " + m.config_hash);
  }
  return m;
}

// Declared in checkpoint_store.h; defined here because the manifest fuzz target compiles this file without
// checkpoint_store.cpp. "step-00000100" -> 100.
std::optional<int64_t> parse_step_dir_name(const std::string& name) {
  if (name.size() < 13 || name.size() > 24 || name.compare(0, 5, "step-") != 0) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

}  // namespace keel::checkpoint

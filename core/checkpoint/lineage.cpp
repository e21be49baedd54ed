// Why: see lineage.h.
#include "core/checkpoint/lineage.h"

#include <algorithm>
#include <ctime>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/json_fields.h"

namespace keel::checkpoint {
using nlohmann::json;

std::string Lineage::kind() const {
  if (is_root()) return "root";
  for (const auto& c : changes) {
    if (!is_operational_key(c.key)) return "branch";
  }
  return data_change_allowed ? "branch" : "continuation";
}

bool is_operational_key(const std::string& key) {
  static const char* const prefixes[] = {"train.steps", "train.log_every", "train.threads",
                                         "metrics.",    "checkpoint.",     "resume."};
  for (const char* p : prefixes) {
    if (key.rfind(p, 0) == 0) return true;
  }
  return false;
}

std::string new_run_id() {
  const std::time_t now = std::time(nullptr);
  std::tm tm_utc{};
  gmtime_r(&now, &tm_utc);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm_utc);
  std::random_device device;  // never LibTorch's generators: a run id must not perturb training randomness
  char suffix[8];
  std::snprintf(suffix, sizeof(suffix), "%06x", device() & 0xffffffu);
  return std::string("run-") + stamp + "-" + suffix;
}

std::string lineage_to_json(const Lineage& l) {
  json changes = json::array();
  for (const auto& c : l.changes) changes.push_back({{"key", c.key}, {"from", c.from}, {"to", c.to}});
  json j = {{"run_id", l.run_id},   {"run_dir", l.run_dir},
            {"created", l.created}, {"kind", l.kind()},
            {"parent", nullptr},    {"changes", changes},
            {"notes", l.notes},     {"data_change_allowed", l.data_change_allowed}};
  json plugins = json::array();
  for (const auto& p : l.plugins) {
    plugins.push_back({{"slot", p.slot},
                       {"name", p.name},
                       {"version", p.version},
                       {"path", p.path},
                       {"sha256", p.sha256},
                       {"from_step", p.from_step},
                       {"until_step", p.until_step}});
  }
  j["plugins"] = plugins;
  if (!l.batch_changes.empty()) {  // absent when the batch never changed: lineages of such runs stay as they were
    json batches = json::array();
    for (const auto& b : l.batch_changes)
      batches.push_back({{"step", b.step}, {"from", b.from}, {"to", b.to}, {"origin", b.origin}});
    j["batch_changes"] = batches;
  }
  if (!l.is_root()) {
    j["parent"] = {{"run_id", l.parent_run_id},
                   {"run_dir", l.parent_run_dir},
                   {"checkpoint", l.parent_checkpoint},
                   {"step", l.parent_step}};
  }
  return j.dump(2) + "\n";
}

Lineage parse_lineage(const std::string& text, const std::string& origin) {
  Lineage l;
  const json j = parse_json_object(text, origin);
  const JsonFields f(j, origin);
  l.run_id = f.string("run_id");
  l.run_dir = f.string_or("run_dir", "");
  l.created = f.string_or("created", "");
  if (f.has("parent") && !f.value("parent").is_null()) {
    const JsonFields p = f.object("parent");
    l.parent_run_id = p.string("run_id");
    l.parent_run_dir = p.string_or("run_dir", "");
    l.parent_checkpoint = p.string_or("checkpoint", "");
    l.parent_step = p.integer("step");
  }
  for (const JsonFields& c : f.objects_or_empty("changes"))
    l.changes.push_back({c.string("key"), c.string("from"), c.string("to")});
  l.notes = f.strings_or_empty("notes");
  l.data_change_allowed = f.boolean_or("data_change_allowed", false);
  for (const JsonFields& p : f.objects_or_empty("plugins")) {  // absent in lineages of older Keel versions
    l.plugins.push_back({p.string("slot"), p.string("name"), p.string_or("version", ""), p.string("path"),
                         p.string("sha256"), p.integer_or("from_step", 0), p.integer_or("until_step", -1)});
  }
  for (const JsonFields& b : f.objects_or_empty("batch_changes")) {  // absent when the batch never changed
    l.batch_changes.push_back({b.integer("step"), b.integer("from"), b.integer("to"), b.string_or("origin", "")});
  }
  if (l.run_id.empty()) throw CheckpointError(origin + ": lineage field 'run_id' is empty");
  return l;
}

std::vector<ConfigChange> diff_configs(const std::vector<std::pair<std::string, std::string>>& parent,
                                       const std::vector<std::pair<std::string, std::string>>& child) {
  std::map<std::string, std::string> a(parent.begin(), parent.end());
  std::map<std::string, std::string> b(child.begin(), child.end());
  std::vector<ConfigChange> out;
  for (const auto& [key, value] : b) {
    const auto it = a.find(key);
    if (it == a.end()) {
      out.push_back({key, "(unset)", value});
    } else if (it->second != value) {
      out.push_back({key, it->second, value});
    }
  }
  for (const auto& [key, value] : a) {
    if (!b.count(key)) out.push_back({key, value, "(unset)"});
  }
  return out;
}

std::vector<std::string> changed_plugin_libraries(const std::vector<PluginRecord>& plugins, int64_t step,
                                                  const std::vector<std::pair<std::string, std::string>>& now,
                                                  const std::string& since) {
  std::vector<std::string> out;
  for (const auto& p : plugins) {
    if (!p.loaded_at(step)) continue;
    const auto it = std::find_if(now.begin(), now.end(), [&](const auto& entry) { return entry.first == p.path; });
    if (it == now.end() || it->second == p.sha256) continue;
    const std::string then = p.sha256.substr(0, 16) + "...";
    out.push_back("plugin " + p.name + " (" + p.slot + "): the library " + p.path + " has changed since " + since +
                  " (sha256 " + then + " then, " +
                  (it->second.empty() ? "unreadable" : it->second.substr(0, 16) + "...") + " now)");
  }
  return out;
}

std::string format_lineage_tree(const std::vector<Lineage>& runs) {
  std::map<std::string, std::vector<size_t>> children;  // parent run id -> runs
  std::vector<size_t> roots;
  std::map<std::string, size_t> by_id;
  for (size_t i = 0; i < runs.size(); ++i) by_id[runs[i].run_id] = i;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].is_root() || !by_id.count(runs[i].parent_run_id)) {
      roots.push_back(i);
    } else {
      children[runs[i].parent_run_id].push_back(i);
    }
  }
  auto by_created = [&](size_t a, size_t b) { return runs[a].created < runs[b].created; };
  std::sort(roots.begin(), roots.end(), by_created);
  for (auto& [id, list] : children) std::sort(list.begin(), list.end(), by_created);

  std::ostringstream out;
  std::function<void(size_t, const std::string&, bool, bool)> print = [&](size_t i, const std::string& prefix,
                                                                          bool last, bool top) {
    const Lineage& l = runs[i];
    out << prefix << (top ? "" : (last ? "└── " : "├── ")) << l.run_dir << "  [" << l.run_id << "]  " << l.kind();
    if (!l.is_root()) {
      out << " from step " << l.parent_step;
      if (top) out << " of " << (l.parent_run_dir.empty() ? l.parent_run_id : l.parent_run_dir);
    }
    out << "\n";
    const std::string detail_prefix = prefix + (top ? "    " : (last ? "    " : "│   "));
    for (const auto& c : l.changes) out << detail_prefix << "  " << c.key << ": " << c.from << " -> " << c.to << "\n";
    for (const auto& n : l.notes) out << detail_prefix << "  " << n << "\n";
    for (const auto& b : l.batch_changes) {
      out << detail_prefix << "  global batch from step " << b.step << ": " << b.from << " -> " << b.to << " ("
          << b.origin << ")\n";
    }
    const auto it = children.find(l.run_id);
    if (it == children.end()) return;
    for (size_t k = 0; k < it->second.size(); ++k)
      print(it->second[k], detail_prefix, k + 1 == it->second.size(), false);
  };
  for (size_t r : roots) print(r, "", true, true);
  return out.str();
}

}  // namespace keel::checkpoint

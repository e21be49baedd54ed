// Why: see plugin_continuity.h.
#include "core/train/plugin_continuity.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/checkpoint/durable_fs.h"
#include "core/metrics/metrics_reader.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;

// The directory of the run that wrote `lineage`'s parent checkpoint: where the checkpoint lies (a run dir's
// checkpoints/step-N), else the run dir its lineage names; "" when neither holds a metrics.h5.
std::string parent_run_dir(const checkpoint::Lineage& l) {
  std::vector<std::string> candidates;
  if (!l.parent_checkpoint.empty())
    candidates.push_back(fs::path(l.parent_checkpoint).lexically_normal().parent_path().parent_path().string());
  if (!l.parent_run_dir.empty()) candidates.push_back(l.parent_run_dir);
  for (const auto& dir : candidates) {
    std::error_code ec;
    if (!dir.empty() && fs::exists(fs::path(dir) / "metrics.h5", ec)) return dir;
  }
  return candidates.empty() ? "" : candidates.front();
}

uint64_t bits_of(double v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
double double_of(uint64_t b) {
  double v = 0;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// Rank 0's history as text for the other ranks (doubles as bit patterns: a NaN loss must arrive as a NaN).
std::string history_to_text(const sdk::WarmStartHistory& h) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& r : h.rows) rows.push_back({r.step, bits_of(r.loss), bits_of(r.grad_norm), r.skipped});
  return nlohmann::json{{"start_step", h.start_step}, {"source", h.source}, {"rows", rows}}.dump();
}
sdk::WarmStartHistory history_from_text(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  sdk::WarmStartHistory h;
  h.start_step = j.at("start_step").get<int64_t>();
  h.source = j.at("source").get<std::string>();
  for (const auto& r : j.at("rows")) {
    h.rows.push_back({r.at(0).get<int64_t>(), double_of(r.at(1).get<uint64_t>()), double_of(r.at(2).get<uint64_t>()),
                      r.at(3).get<bool>()});
  }
  return h;
}

void warn(TrainerState& s, int64_t step, const std::string& line) {
  s.event(step, "warning", line);
  if (s.rank0()) spdlog::warn("{}", line);
}

}  // namespace

std::vector<HistorySegment> history_segments(const checkpoint::Lineage& lineage, const std::string& own_metrics,
                                             int64_t start_step) {
  std::vector<HistorySegment> out;
  if (!own_metrics.empty()) out.push_back({own_metrics, start_step});
  checkpoint::Lineage l = lineage;
  for (int depth = 0; depth < 64 && !l.is_root(); ++depth) {  // a lineage cycle (hand-edited files) ends here
    const std::string dir = parent_run_dir(l);
    if (dir.empty()) break;
    out.push_back({(fs::path(dir) / "metrics.h5").string(), l.parent_step});
    try {
      l = checkpoint::parse_lineage(checkpoint::read_small_file((fs::path(dir) / "lineage.json").string()),
                                    dir + "/lineage.json");
    } catch (const std::exception&) {
      break;  // an ancestor without a readable lineage: its history is where the walk stops
    }
  }
  return out;
}

sdk::WarmStartHistory read_history(const std::vector<HistorySegment>& segments, int64_t start_step, int64_t max_rows) {
  sdk::WarmStartHistory history;
  history.start_step = start_step;
  std::map<int64_t, sdk::HistoryRow> rows;  // by step
  int64_t limit = start_step;
  auto add_source = [&](const std::string& text) { history.source += (history.source.empty() ? "" : "; ") + text; };
  for (const auto& segment : segments) {
    if (static_cast<int64_t>(rows.size()) >= max_rows) break;
    limit = std::min(limit, segment.before_step);
    try {
      const metrics::MetricsReader reader(segment.metrics_path);
      const std::vector<int64_t> steps = reader.read_int64("/train/step");
      const std::vector<double> loss = reader.read_double("/train/loss");
      const std::vector<double> grad_norm = reader.read_double("/train/grad_norm");
      const std::vector<int64_t> skipped = reader.read_int64("/train/skipped");
      // A kill during a flush can leave columns of different lengths: the shortest is what every column holds.
      const size_t n = std::min({steps.size(), loss.size(), grad_norm.size(), skipped.size()});
      std::map<int64_t, sdk::HistoryRow> found;
      for (size_t i = 0; i < n; ++i) {
        if (steps[i] < limit) found[steps[i]] = {steps[i], loss[i], grad_norm[i], skipped[i] != 0};  // last wins
      }
      if (found.empty()) {
        add_source(segment.metrics_path + " (no rows before step " + std::to_string(limit) + ")");
        continue;
      }
      add_source(segment.metrics_path + " steps " + std::to_string(found.begin()->first) + "-" +
                 std::to_string(found.rbegin()->first));
      rows.insert(found.begin(), found.end());
    } catch (const std::exception& e) {
      add_source(segment.metrics_path + " unreadable (" + e.what() + ")");
      break;  // older files would leave a gap
    }
  }
  if (segments.empty()) add_source("no parent run");
  for (const auto& [step, row] : rows) history.rows.push_back(row);
  if (static_cast<int64_t>(history.rows.size()) > max_rows)
    history.rows.erase(history.rows.begin(), history.rows.end() - max_rows);
  return history;
}

void record_loaded_plugins(TrainerState& s, int64_t step) {
  for (const plugin_host::LoadedPlugin* p : s.plugins->all()) {
    s.lineage.plugins.push_back(
        {p->slot, p->name(), p->description.version, p->description.path, p->sha256, step, /*until_step=*/-1});
  }
}

void continue_plugins_after_resume(TrainerState& s, const checkpoint::TrainingState& st,
                                   const std::vector<plugin_host::LoadedPlugin*>& fresh) {
  const std::string origin = s.lineage.parent_checkpoint.empty() ? "the checkpoint" : s.lineage.parent_checkpoint;
  std::vector<checkpoint::PluginRecord> recorded;
  if (!st.lineage.empty()) recorded = checkpoint::parse_lineage(st.lineage, origin + ": lineage").plugins;
  std::vector<std::pair<std::string, std::string>> now;  // path -> SHA-256 of the library loaded from it now
  for (const plugin_host::LoadedPlugin* p : s.plugins->all()) now.emplace_back(p->description.path, p->sha256);
  for (const auto& line :
       checkpoint::changed_plugin_libraries(recorded, st.step, now, "checkpoint " + origin + " was written")) {
    warn(s, st.step, line);
    s.lineage.notes.push_back(line);
  }
  warm_start_plugins(s, fresh, st.step, "");
}

void refuse_changed_libraries(TrainerState& s, const std::vector<plugin_host::LoadedPlugin>& loaded, int64_t step) {
  std::vector<std::pair<std::string, std::string>> now;
  for (const auto& p : loaded) now.emplace_back(p.description.path, p.sha256);
  // The newest record of each path this run loaded: was the file the same then?
  std::vector<checkpoint::PluginRecord> newest;
  for (auto it = s.lineage.plugins.rbegin(); it != s.lineage.plugins.rend(); ++it) {
    const bool seen = std::any_of(newest.begin(), newest.end(), [&](const auto& r) { return r.path == it->path; });
    if (!seen) newest.push_back(*it);
  }
  for (auto& r : newest) {  // compare with every library this run loaded, now or before
    r.from_step = 0;
    r.until_step = -1;
  }
  const std::vector<std::string> changed =
      checkpoint::changed_plugin_libraries(newest, step, now, "this run loaded it");
  for (const auto& line : changed) warn(s, step, line);
  if (!changed.empty()) {
    throw plugin_host::PluginError(changed.front() +
                                   "; this process already loaded a library from that path and would run that one "
                                   "again, not the new file: copy the new library to another path and swap to that");
  }
}

void record_swap(TrainerState& s, const std::string& slot, const std::vector<plugin_host::LoadedPlugin>& loaded,
                 int64_t step) {
  for (auto& r : s.lineage.plugins) {
    if (r.slot == slot && r.until_step < 0) r.until_step = step;
  }
  for (const auto& p : loaded)
    s.lineage.plugins.push_back({p.slot, p.name(), p.description.version, p.description.path, p.sha256, step, -1});
}

void warm_start_plugins(TrainerState& s, const std::vector<plugin_host::LoadedPlugin*>& fresh, int64_t start_step,
                        const std::string& own_metrics) {
  if (start_step <= 0) return;  // a run from step 0 has no history to miss
  std::vector<plugin_host::LoadedPlugin*> hooked;
  for (plugin_host::LoadedPlugin* p : fresh) {
    if (p->description.warm_start) {
      hooked.push_back(p);
    } else if (p->slot == "spike_handler") {
      warn(s, start_step,
           "[" + p->name() + "] spike handler starts at step " + std::to_string(start_step) +
               " with no history: it does not implement the warm-start hook (KEEL_PLUGIN_WARM_START, docs/plugins.md)");
    }
  }
  if (hooked.empty()) return;
  // Rank 0 reads the files and sends the rows, so that every rank's plugin starts from the same history.
  std::string text;
  if (s.rank0()) {
    if (!own_metrics.empty() && s.metrics) s.metrics->flush();  // this run's rows so far, into the file
    text = history_to_text(read_history(history_segments(s.lineage, own_metrics, start_step), start_step));
  }
  if (!s.groups.world->single()) text = s.groups.world->broadcast_string(text, 0);
  const sdk::WarmStartHistory history = history_from_text(text);
  for (plugin_host::LoadedPlugin* p : hooked) {
    sdk::WarmStartResult result;
    try {
      result = p->library->warm_start(*p->object, history);
    } catch (const std::exception& e) {
      throw plugin_host::PluginError(std::string(e.what()) + " (" + p->slot + ", before step " +
                                     std::to_string(start_step) + ")");
    }
    const std::string name = "[" + p->name() + "] ";
    if (result.rows_used > 0) {
      const std::string text = name + std::to_string(result.rows_used) + " rows of history before step " +
                               std::to_string(start_step) + " from " + history.source;
      s.event(start_step, "warm_start", text);
      s.lineage.notes.push_back("warm start: " + text);
      if (s.rank0()) spdlog::info("warm start: {}", text);
    }
    if (result.inactive_steps > 0) {
      warn(s, start_step,
           name + (history.rows.empty() ? "no history to warm start from" : "too little history") + " (" +
               history.source + "): inactive for the first " + std::to_string(result.inactive_steps) +
               " steps (steps " + std::to_string(start_step) + "-" +
               std::to_string(start_step + result.inactive_steps - 1) + ")");
    }
  }
}

}  // namespace keel::train

// Why: see run_order.h. Everything is read from the run directories (lineage.json, config.ini, checkpoints,
// metrics.h5); nothing is written.
#include "core/data/run_order.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/metrics/metrics_reader.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace keel::data {
namespace {

checkpoint::Lineage read_lineage(const std::string& run_dir) {
  const std::string path = run_dir + "/lineage.json";
  if (!fs::exists(path)) throw DataError(run_dir + ": no lineage.json (not a Keel run directory)");
  return checkpoint::parse_lineage(checkpoint::read_small_file(path), path);
}

// A run and its ancestors, nearest first: (run id, run dir, the step it started at).
struct Ancestor {
  std::string run_id;
  std::string dir;
  int64_t start_step = 0;
};
std::vector<Ancestor> ancestry(const std::string& run_dir) {
  std::vector<Ancestor> chain;
  std::string dir = run_dir;
  for (int depth = 0; depth < 1000 && !dir.empty() && fs::exists(dir + "/lineage.json"); ++depth) {
    const checkpoint::Lineage l = read_lineage(dir);
    chain.push_back({l.run_id, dir, l.is_root() ? 0 : l.parent_step});
    if (l.is_root()) break;
    dir = l.parent_run_dir;
  }
  return chain;
}

}  // namespace

json read_checkpoint_ledger(const std::string& checkpoint_dir) {
  const checkpoint::Manifest manifest = checkpoint::verify_checkpoint_dir(checkpoint_dir);
  const checkpoint::ManifestFile* rank0 = manifest.rank_file(0);
  if (!rank0) throw DataError(checkpoint_dir + ": manifest lists no rank-0 file");
  const checkpoint::H5Reader reader(checkpoint_dir + "/" + rank0->name);
  try {
    return json::parse(reader.read_text("/data/ledger"));
  } catch (const json::exception& e) {
    throw DataError(checkpoint_dir + "/" + rank0->name + ": /data/ledger: malformed (" + e.what() + ")");
  }
}

RunOrder::RunOrder(const std::string& run_dir, const std::vector<std::string>& overrides)
    : run_dir_(run_dir), overrides_(overrides) {
  const checkpoint::Lineage lineage = read_lineage(run_dir_);
  const std::string config_path = run_dir_ + "/config.ini";
  if (!fs::exists(config_path)) throw DataError(run_dir_ + ": no config.ini (not a Keel run directory)");
  config_ = keel::load_config(config_path, overrides_);
  if (!lineage.is_root()) {
    start_step_ = lineage.parent_step;
    parent_run_dir_ = lineage.parent_run_dir;
    parent_checkpoint_ = lineage.parent_checkpoint;
    data_change_allowed_ = lineage.data_change_allowed;
  }
  // The newest checkpoint's mixture history and skip rules: everything the run changed on its surviving path
  // (mixture plugins, swaps, rollback skips), each with the step it applies from.
  for (const auto& e : checkpoint::CheckpointStore(run_dir_ + "/checkpoints").list_valid()) {
    if (e.step >= start_step_) checkpoints_.emplace_back(e.step, e.dir);
  }
  if (!checkpoints_.empty()) {
    history_checkpoint_ = checkpoints_.back().second;
    final_ledger_ = std::make_unique<json>(read_checkpoint_ledger(history_checkpoint_));
  }
  loader_ = start_loader(checkpoints_.empty() ? start_step_ : checkpoints_.back().first);
}

RunOrder::~RunOrder() = default;

std::unique_ptr<DataLoader> RunOrder::start_loader(int64_t step) const {
  auto loader = std::make_unique<DataLoader>(config_, config_.global_batch());
  // The cursors: the run's newest checkpoint at or before `step`, else where the run started.
  const std::pair<int64_t, std::string>* base = nullptr;
  for (const auto& c : checkpoints_) {
    if (c.first <= step) base = &c;
  }
  if (base) {
    loader->load_state(read_checkpoint_ledger(base->second));
  } else if (!parent_checkpoint_.empty()) {
    // As the trainer resumed: the parent checkpoint's ledger, then the run's own config where it differs.
    if (!fs::exists(parent_checkpoint_)) {
      throw DataError(run_dir_ + " started from " + parent_checkpoint_ + " (lineage.json), which is gone, and has no " +
                      "checkpoint of its own at or before step " + std::to_string(step) +
                      ": its data order there cannot be replayed");
    }
    loader->load_state(read_checkpoint_ledger(parent_checkpoint_), data_change_allowed_);
    loader->adopt_config(config_);
  }
  if (final_ledger_) {
    json state = loader->state();
    state["mixture_history"] = final_ledger_->at("mixture_history");
    state["skip"] = final_ledger_->at("skip");
    state["data_order_version"] = final_ledger_->value("data_order_version", 1);  // a root run's pick, too
    // The global batch by step (a ledger of a constant batch has no batch_history: its global_batch holds).
    if (final_ledger_->contains("batch_history")) {
      state["batch_history"] = final_ledger_->at("batch_history");
    } else {
      state.erase("batch_history");
      state["global_batch"] = final_ledger_->at("global_batch");
    }
    loader->load_state(state);
  }
  return loader;
}

std::vector<BatchPlan> RunOrder::plans(int64_t first, int64_t last) const {
  if (first < 0 || last < first) {
    throw DataError("steps " + std::to_string(first) + ".." + std::to_string(last) + ": need 0 <= first <= last");
  }
  std::vector<BatchPlan> out;
  if (first < start_step_) {
    if (parent_run_dir_.empty() || !fs::exists(parent_run_dir_ + "/lineage.json")) {
      throw DataError("step " + std::to_string(first) + " precedes " + run_dir_ + "'s branch point (step " +
                      std::to_string(start_step_) + ") and its parent run " +
                      (parent_run_dir_.empty() ? "is unknown" : parent_run_dir_ + " is gone"));
    }
    out = RunOrder(parent_run_dir_, overrides_).plans(first, std::min(last, start_step_ - 1));
    if (last < start_step_) return out;
  }
  const std::unique_ptr<DataLoader> loader = start_loader(std::max(first, start_step_));
  while (loader->step() <= last) {
    BatchPlan plan = loader->plan_next();
    if (plan.step >= first) out.push_back(std::move(plan));
  }
  return out;
}

std::vector<double> RunOrder::weights_at(int64_t step) const { return loader_->weights_at(step); }

double expected_same_source_share(const std::vector<double>& a, const std::vector<double>& b) {
  double share = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!(a[i] > 0) || !(b[i] > 0)) continue;
    double sum = 0.0;
    for (size_t j = 0; j < a.size() && j < b.size(); ++j) sum += std::max(a[j] / a[i], b[j] / b[i]);
    share += 1.0 / sum;
  }
  return share;
}

json compare_order(const std::string& run_a, const std::string& run_b,
                   std::optional<std::pair<int64_t, int64_t>> steps) {
  // The common branch point: where the nearer of the two lines of descent left their nearest common ancestor.
  const std::vector<Ancestor> chain_a = ancestry(run_a), chain_b = ancestry(run_b);
  if (chain_a.empty()) throw DataError(run_a + ": no lineage.json (not a Keel run directory)");
  if (chain_b.empty()) throw DataError(run_b + ": no lineage.json (not a Keel run directory)");
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  int64_t branch = 0;
  json ancestor = nullptr;
  for (size_t i = 0; i < chain_a.size() && ancestor.is_null(); ++i) {
    for (size_t j = 0; j < chain_b.size(); ++j) {
      if (chain_a[i].run_id != chain_b[j].run_id) continue;
      const int64_t left_a = i == 0 ? kNever : chain_a[i - 1].start_step;
      const int64_t left_b = j == 0 ? kNever : chain_b[j - 1].start_step;
      branch = std::min(left_a, left_b) == kNever ? 0 : std::min(left_a, left_b);
      ancestor = chain_a[i].dir;
      break;
    }
  }
  const metrics::MetricsReader reader_a(run_a + "/metrics.h5"), reader_b(run_b + "/metrics.h5");
  const auto rec_a = reader_a.read_batches_by_step(), rec_b = reader_b.read_batches_by_step();
  if (rec_a.empty()) throw DataError(run_a + "/metrics.h5: no /data/batch record (a run of an older Keel?)");
  if (rec_b.empty()) throw DataError(run_b + "/metrics.h5: no /data/batch record (a run of an older Keel?)");
  const std::vector<std::string> names_a = reader_a.batch_sources(), names_b = reader_b.batch_sources();
  std::vector<std::string> names = names_a;
  for (const auto& n : names_b) {
    if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  }
  auto by_name = [&](const std::vector<std::string>& run_names, const std::vector<double>& w) {
    std::vector<double> out(names.size(), 0.0);
    for (size_t i = 0; i < run_names.size() && i < w.size(); ++i)
      out[static_cast<size_t>(std::find(names.begin(), names.end(), run_names[i]) - names.begin())] = w[i];
    return out;
  };
  const RunOrder order_a(run_a), order_b(run_b);
  std::map<std::string, std::pair<int64_t, int64_t>> per_source;  // name -> (same source, same sample)
  for (const auto& n : names) per_source[n] = {0, 0};
  int64_t slots = 0, same_source = 0, same_sample = 0, compared_steps = 0, first = -1, last = -1;
  double expected = 0.0;
  for (const auto& [step, rows_a] : rec_a) {
    const auto it = rec_b.find(step);
    if (step < branch || it == rec_b.end()) continue;
    if (steps && (step < steps->first || step > steps->second)) continue;
    const auto& rows_b = it->second;
    const size_t n = std::min(rows_a.size(), rows_b.size());
    const double p = expected_same_source_share(by_name(order_a.loader().source_names(), order_a.weights_at(step)),
                                                by_name(order_b.loader().source_names(), order_b.weights_at(step)));
    for (size_t k = 0; k < n; ++k) {
      const std::string& source = names_a.at(static_cast<size_t>(rows_a[k].source));
      if (source != names_b.at(static_cast<size_t>(rows_b[k].source))) continue;
      ++same_source;
      ++per_source[source].first;
      if (rows_a[k].sample_id == rows_b[k].sample_id) {
        ++same_sample;
        ++per_source[source].second;
      }
    }
    slots += static_cast<int64_t>(n);
    expected += p * static_cast<double>(n);
    ++compared_steps;
    if (first < 0) first = step;
    last = step;
  }
  if (slots == 0) {
    throw DataError(run_a + " and " + run_b + " recorded no common step at or after their branch point (step " +
                    std::to_string(branch) + ")" + (steps ? " in the steps asked for" : ""));
  }
  json sources = json::object();
  for (const auto& [name, counts] : per_source)
    sources[name] = {{"same_source", counts.first}, {"same_sample", counts.second}};
  return {{"run_a", run_a},
          {"run_b", run_b},
          {"common_ancestor", ancestor},
          {"branch_step", branch},
          {"steps", compared_steps},
          {"first_step", first},
          {"last_step", last},
          {"slots", slots},
          {"same_source_share", static_cast<double>(same_source) / static_cast<double>(slots)},
          {"expected_same_source_share", expected / static_cast<double>(slots)},
          {"same_sample_share", static_cast<double>(same_sample) / static_cast<double>(slots)},
          {"sources", sources}};
}

}  // namespace keel::data

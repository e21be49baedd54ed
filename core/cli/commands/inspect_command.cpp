// Why: `keel inspect` answers "what is this?" without h5py:
//   keel inspect RUN_DIR           config, how far it got, metrics summary, events, lineage, checkpoints;
//   keel inspect CKPT_DIR          a checkpoint: verification, manifest, lineage, every tensor with dtype/shape;
//   keel inspect RUN_DIR RUN_DIR…  the lineage tree of a set of runs (base run, continuations, branches).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/cli/commands/commands.h"
#include "core/metrics/metrics_reader.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

checkpoint::Lineage read_run_lineage(const std::string& run_dir) {
  const std::string path = run_dir + "/lineage.json";
  if (!fs::exists(path)) throw std::runtime_error(run_dir + " has no lineage.json (not a Keel run dir, or made before lineage)");
  return checkpoint::parse_lineage(checkpoint::read_small_file(path), path);
}

void print_lineage(const checkpoint::Lineage& l) {
  std::cout << "\nlineage: " << l.run_id << " (" << l.kind() << ")\n";
  if (!l.is_root()) {
    std::cout << "  parent: " << l.parent_run_dir << " [" << l.parent_run_id << "] at step " << l.parent_step << "\n"
              << "  from checkpoint: " << l.parent_checkpoint << "\n";
  }
  for (const auto& c : l.changes) std::cout << "  changed " << c.key << ": " << c.from << " -> " << c.to << "\n";
  for (const auto& n : l.notes) std::cout << "  note: " << n << "\n";
}

void print_metrics_summary(const std::string& metrics_path) {
  metrics::MetricsReader reader(metrics_path);
  std::cout << "\nconfig:\n";
  for (const auto& [key, value] : reader.read_config()) std::cout << "  " << key << " = " << value << "\n";

  std::vector<int64_t> steps = reader.read_int64("/train/step");
  std::vector<double> loss = reader.read_double("/train/loss");
  std::vector<double> grad_norm = reader.read_double("/train/grad_norm");
  std::vector<double> tokens_per_s = reader.read_double("/train/tokens_per_s");
  std::vector<int64_t> tokens = reader.read_int64("/train/tokens");
  // A kill during a flush can leave some columns one flush longer than /train/step: use the common length.
  const size_t rows = std::min({steps.size(), loss.size(), grad_norm.size(), tokens_per_s.size(), tokens.size()});
  steps.resize(rows);
  loss.resize(rows);
  grad_norm.resize(rows);
  tokens_per_s.resize(rows);
  tokens.resize(rows);
  std::cout << "\nmetrics: " << steps.size() << " steps";
  if (!steps.empty()) {
    std::cout << " (" << steps.front() << " .. " << steps.back() << "), " << tokens.back() << " tokens\n";
    auto mean_of = [](const std::vector<double>& v, size_t from, size_t to) {
      double sum = 0.0;
      for (size_t i = from; i < to; ++i) sum += v[i];
      return sum / std::max<size_t>(1, to - from);
    };
    const size_t n = loss.size(), window = std::max<size_t>(1, std::min<size_t>(10, n / 2));
    std::cout << std::fixed << std::setprecision(4) << "  loss: first " << loss.front() << ", last " << loss.back()
              << ", min " << *std::min_element(loss.begin(), loss.end()) << " (mean of first " << window << ": "
              << mean_of(loss, 0, window) << ", last " << window << ": " << mean_of(loss, n - window, n) << ")\n"
              << "  grad norm: last " << grad_norm.back() << ", max " << *std::max_element(grad_norm.begin(), grad_norm.end())
              << "\n";
    // Median throughput after the warm-up steps (allocator and thread-pool warm-up distort the first few).
    const size_t warmup = std::min<size_t>(5, tokens_per_s.size() - 1);
    std::vector<double> sorted(tokens_per_s.begin() + warmup, tokens_per_s.end());
    std::sort(sorted.begin(), sorted.end());
    std::cout << std::setprecision(0) << "  tokens/s: median " << sorted[sorted.size() / 2] << " (after " << warmup
              << " warm-up steps)\n";
    std::cout.unsetf(std::ios::floatfield);
  } else {
    std::cout << "\n";
  }
  const auto events = reader.read_events();
  std::cout << "\nevents: " << events.size() << "\n";
  for (const auto& e : events) std::cout << "  step " << e.step << "  " << e.kind << "  " << e.text << "\n";
}

void print_checkpoints(const std::string& run_dir) {
  checkpoint::CheckpointStore store(run_dir + "/checkpoints");
  const auto all = store.list();
  std::cout << "\ncheckpoints: " << all.size() << "\n";
  std::optional<std::string> latest;
  try {
    latest = store.latest_pointer();
  } catch (const checkpoint::CheckpointError& e) {
    std::cout << "  latest pointer: " << e.what() << "\n";
  }
  for (const auto& e : all) {
    std::string status = "valid";
    try {
      checkpoint::verify_checkpoint_dir(e.dir);
    } catch (const checkpoint::CheckpointError& err) {
      status = std::string("INVALID: ") + err.what();
    }
    std::cout << "  step " << std::setw(8) << e.step << "  " << e.dir << "  " << status
              << (latest && *latest == e.dir ? "  (latest)" : "") << "\n";
  }
}

int inspect_checkpoint(const std::string& dir) {
  std::cout << "checkpoint: " << dir << "\n";
  const checkpoint::Manifest m = checkpoint::verify_checkpoint_dir(dir);  // throws, naming the damaged file
  std::cout << "  verified: every file matches its size and SHA-256\n"
            << "  step: " << m.step << " (training resumes at step index " << m.step << ")\n"
            << "  keel version: " << m.keel_version << ", created " << m.created << "\n"
            << "  layout: dp " << m.layout.dp << " x tp " << m.layout.tp << " x pp " << m.layout.pp << "\n"
            << "  config hash: " << m.config_hash << "\n  files:\n";
  for (const auto& f : m.files) {
    std::cout << "    " << f.name << "  " << f.bytes << " bytes  sha256 " << f.sha256
              << (f.rank >= 0 ? "  rank " + std::to_string(f.rank) : "") << "\n";
  }
  print_lineage(checkpoint::parse_lineage(m.lineage, dir + "/manifest.json"));
  const checkpoint::H5Reader rank0(dir + "/" + m.rank_file(0)->name);
  std::cout << "\noptimizer: " << rank0.string_attribute("/optimizer", "name") << ", step "
            << rank0.int_attribute("/optimizer", "step") << "\nlr schedule: " << rank0.read_text("/lr_schedule") << "\n";
  const auto ledger = nlohmann::json::parse(rank0.read_text("/data/ledger"));
  std::cout << "data ledger: step " << ledger.value("step", -1) << ", next sample " << ledger.value("next_sample", -1) << "\n";
  for (const auto& s : ledger.value("sources", nlohmann::json::array())) {
    std::cout << "  " << s.value("name", "?") << ": epoch " << s.value("epoch", -1) << ", position " << s.value("position", -1)
              << ", consumed " << s.value("consumed", -1) << ", skipped " << s.value("skipped", -1) << "\n";
  }
  // Every rank file's tensors; a shard shows where it sits in the whole tensor.
  auto dims = [](const std::vector<int64_t>& v) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
    return out + "]";
  };
  for (const auto& f : m.files) {
    if (f.rank < 0) continue;
    const checkpoint::H5Reader file(dir + "/" + f.name);
    if (m.files.size() > 2) std::cout << "\n" << f.name << " (rank " << f.rank << "):";
    for (const char* group : {"/model", "/optimizer/state", "/rng"}) {
      const auto names = file.datasets_under(group);
      std::cout << "\n" << group << ": " << names.size() << " tensors\n";
      for (const auto& name : names) {
        const checkpoint::RawTensor t = file.read_tensor(std::string(group) + "/" + name);
        std::cout << "  " << name << "  " << checkpoint::dtype_name(t.dtype) << " " << dims(t.shape);
        if (t.global_shape != t.shape) std::cout << " of " << dims(t.global_shape) << " at " << dims(t.offset);
        std::cout << "\n";
      }
    }
  }
  return 0;
}

}  // namespace

int cmd_inspect(const Args& args) {
  if (args.empty() || std::any_of(args.begin(), args.end(), [](const std::string& a) { return a.rfind("--", 0) == 0; }))
    throw std::runtime_error("usage: keel inspect RUN_DIR | CKPT_DIR | RUN_DIR RUN_DIR...");
  if (args.size() > 1) {
    std::vector<checkpoint::Lineage> runs;
    for (const auto& dir : args) runs.push_back(read_run_lineage(dir));
    std::cout << "lineage of " << runs.size() << " runs:\n" << checkpoint::format_lineage_tree(runs);
    return 0;
  }
  const std::string dir = args[0];
  if (checkpoint::names_checkpoint_dir(dir)) return inspect_checkpoint(dir);
  const std::string metrics_path = dir + "/metrics.h5";
  if (!fs::exists(metrics_path)) throw std::runtime_error(dir + " is not a Keel run dir: " + metrics_path + " not found");
  std::cout << "run dir: " << dir << "\n";
  print_metrics_summary(metrics_path);
  if (fs::exists(dir + "/lineage.json")) print_lineage(read_run_lineage(dir));
  print_checkpoints(dir);
  return 0;
}

}  // namespace keel::cli

// Why: `keel inspect` answers "what is this?" without h5py:
//   keel inspect RUN_DIR           config, how far it got, metrics summary, events, lineage, checkpoints;
//   keel inspect CKPT_DIR          a checkpoint: verification, manifest, lineage, every tensor with dtype/shape;
//   keel inspect RUN_DIR RUN_DIR…  the lineage tree of a set of runs (base run, continuations, branches).
// With --json each prints one JSON object instead (docs/cli.md), built from the same values as the text, so
// that scripts (bench/, experiments/) never read the human listing.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <regex>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/logger.h"
#include "core/metrics/metrics_reader.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

checkpoint::Lineage read_run_lineage(const std::string& run_dir) {
  const std::string path = run_dir + "/lineage.json";
  if (!fs::exists(path))
    throw std::runtime_error(run_dir + " has no lineage.json (not a Keel run dir, or made before lineage)");
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

nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json lineage_json(const checkpoint::Lineage& l) {
  return nlohmann::json::parse(checkpoint::lineage_to_json(l));
}

// What `keel inspect RUN_DIR` says about metrics.h5, computed once for the text and the JSON.
struct MetricsSummary {
  std::vector<std::pair<std::string, std::string>> config;
  size_t rows = 0;  // rows of /train (a re-run step after a rollback has two)
  int64_t first_step = 0, last_step = 0, tokens = 0;
  double loss_first = 0, loss_last = 0, loss_min = 0, loss_mean_first = 0, loss_mean_last = 0;
  size_t window = 0;
  double grad_norm_last = 0, grad_norm_max = 0;
  double tokens_per_s_median = 0;
  size_t warmup = 0;
  std::vector<metrics::Event> events;
};

MetricsSummary summarize_metrics(const std::string& metrics_path) {
  metrics::MetricsReader reader(metrics_path);
  MetricsSummary m;
  m.config = reader.read_config();
  std::vector<int64_t> steps = reader.read_int64("/train/step");
  std::vector<double> loss = reader.read_double("/train/loss");
  std::vector<double> grad_norm = reader.read_double("/train/grad_norm");
  std::vector<double> tokens_per_s = reader.read_double("/train/tokens_per_s");
  std::vector<int64_t> tokens = reader.read_int64("/train/tokens");
  // A kill during a flush can leave some columns one flush longer than /train/step: use the common length.
  m.rows = std::min({steps.size(), loss.size(), grad_norm.size(), tokens_per_s.size(), tokens.size()});
  if (m.rows > 0) {
    const size_t n = m.rows;
    loss.resize(n);
    grad_norm.resize(n);
    tokens_per_s.resize(n);
    auto mean_of = [](const std::vector<double>& v, size_t from, size_t to) {
      double sum = 0.0;
      for (size_t i = from; i < to; ++i) sum += v[i];
      return sum / std::max<size_t>(1, to - from);
    };
    m.first_step = steps.front();
    m.last_step = steps[n - 1];
    m.tokens = tokens[n - 1];
    m.window = std::max<size_t>(1, std::min<size_t>(10, n / 2));
    m.loss_first = loss.front();
    m.loss_last = loss.back();
    m.loss_min = *std::min_element(loss.begin(), loss.end());
    m.loss_mean_first = mean_of(loss, 0, m.window);
    m.loss_mean_last = mean_of(loss, n - m.window, n);
    m.grad_norm_last = grad_norm.back();
    m.grad_norm_max = *std::max_element(grad_norm.begin(), grad_norm.end());
    // Median throughput after the warm-up steps (allocator and thread-pool warm-up distort the first few).
    m.warmup = std::min<size_t>(5, n - 1);
    std::vector<double> sorted(tokens_per_s.begin() + static_cast<std::ptrdiff_t>(m.warmup), tokens_per_s.end());
    std::sort(sorted.begin(), sorted.end());
    m.tokens_per_s_median = sorted[sorted.size() / 2];
  }
  m.events = reader.read_events();
  return m;
}

void print_metrics_summary(const MetricsSummary& m) {
  std::cout << "\nconfig:\n";
  for (const auto& [key, value] : m.config) std::cout << "  " << key << " = " << value << "\n";
  std::cout << "\nmetrics: " << m.rows << " steps";
  if (m.rows > 0) {
    std::cout << " (" << m.first_step << " .. " << m.last_step << "), " << m.tokens << " tokens\n";
    std::cout << std::fixed << std::setprecision(4) << "  loss: first " << m.loss_first << ", last " << m.loss_last
              << ", min " << m.loss_min << " (mean of first " << m.window << ": " << m.loss_mean_first << ", last "
              << m.window << ": " << m.loss_mean_last << ")\n"
              << "  grad norm: last " << m.grad_norm_last << ", max " << m.grad_norm_max << "\n";
    std::cout << std::setprecision(0) << "  tokens/s: median " << m.tokens_per_s_median << " (after " << m.warmup
              << " warm-up steps)\n";
    std::cout.unsetf(std::ios::floatfield);
  } else {
    std::cout << "\n";
  }
  std::cout << "\nevents: " << m.events.size() << "\n";
  for (const auto& e : m.events) std::cout << "  step " << e.step << "  " << e.kind << "  " << e.text << "\n";
}

// The last run_end event ("steps run N[, peak CUDA memory B bytes]", core/train/trainer.cpp) as
// {step, steps_run, peak_cuda_memory_bytes}; null when the run has not ended (or was killed).
nlohmann::json run_end_json(const std::vector<metrics::Event>& events) {
  const auto it = std::find_if(events.rbegin(), events.rend(), [](const auto& e) { return e.kind == "run_end"; });
  if (it == events.rend()) return nullptr;
  nlohmann::json j{{"step", it->step}, {"steps_run", nullptr}, {"peak_cuda_memory_bytes", nullptr}};
  std::smatch match;
  if (std::regex_search(it->text, match, std::regex(R"(steps run (\d+))"))) j["steps_run"] = std::stoll(match[1].str());
  if (std::regex_search(it->text, match, std::regex(R"(peak CUDA memory (\d+) bytes)")))
    j["peak_cuda_memory_bytes"] = std::stoll(match[1].str());
  return j;
}

nlohmann::json metrics_json(const MetricsSummary& m) {
  nlohmann::json config = nlohmann::json::object();
  for (const auto& [key, value] : m.config) config[key] = value;
  nlohmann::json metrics{{"rows", m.rows}};
  if (m.rows > 0) {
    metrics["first_step"] = m.first_step;
    metrics["last_step"] = m.last_step;
    metrics["tokens"] = m.tokens;
    metrics["loss"] = {{"first", number(m.loss_first)},
                       {"last", number(m.loss_last)},
                       {"min", number(m.loss_min)},
                       {"window", m.window},
                       {"mean_first", number(m.loss_mean_first)},
                       {"mean_last", number(m.loss_mean_last)}};
    metrics["grad_norm"] = {{"last", number(m.grad_norm_last)}, {"max", number(m.grad_norm_max)}};
    metrics["tokens_per_s"] = {{"median", number(m.tokens_per_s_median)}, {"warmup_steps", m.warmup}};
  } else {
    metrics["first_step"] = metrics["last_step"] = metrics["tokens"] = nullptr;
    metrics["loss"] = metrics["grad_norm"] = metrics["tokens_per_s"] = nullptr;
  }
  nlohmann::json events = nlohmann::json::array();
  for (const auto& e : m.events) events.push_back({{"step", e.step}, {"kind", e.kind}, {"text", e.text}});
  return {{"config", config}, {"metrics", metrics}, {"events", events}, {"run_end", run_end_json(m.events)}};
}

// The checkpoints of a run dir with their verification, and the latest pointer (or why it cannot be read).
struct CheckpointList {
  std::vector<checkpoint::CheckpointEntry> all;
  std::vector<std::string> errors;  // per entry: empty when valid
  std::optional<std::string> latest;
  std::string latest_error;
};

CheckpointList list_checkpoints(const std::string& run_dir) {
  checkpoint::CheckpointStore store(run_dir + "/checkpoints");
  CheckpointList out;
  out.all = store.list();
  try {
    out.latest = store.latest_pointer();
  } catch (const checkpoint::CheckpointError& e) {
    out.latest_error = e.what();
  }
  for (const auto& e : out.all) {
    out.errors.emplace_back();
    try {
      checkpoint::verify_checkpoint_dir(e.dir);
    } catch (const checkpoint::CheckpointError& err) {
      out.errors.back() = err.what();
    }
  }
  return out;
}

void print_checkpoints(const CheckpointList& c) {
  std::cout << "\ncheckpoints: " << c.all.size() << "\n";
  if (!c.latest_error.empty()) std::cout << "  latest pointer: " << c.latest_error << "\n";
  for (size_t i = 0; i < c.all.size(); ++i) {
    const auto& e = c.all[i];
    const std::string status = c.errors[i].empty() ? "valid" : "INVALID: " + c.errors[i];
    std::cout << "  step " << std::setw(8) << e.step << "  " << e.dir << "  " << status
              << (c.latest && *c.latest == e.dir ? "  (latest)" : "") << "\n";
  }
}

nlohmann::json checkpoints_json(const CheckpointList& c) {
  nlohmann::json list = nlohmann::json::array();
  for (size_t i = 0; i < c.all.size(); ++i) {
    const auto& e = c.all[i];
    list.push_back({{"step", e.step},
                    {"dir", e.dir},
                    {"valid", c.errors[i].empty()},
                    {"error", c.errors[i].empty() ? nlohmann::json(nullptr) : nlohmann::json(c.errors[i])},
                    {"latest", c.latest && *c.latest == e.dir}});
  }
  return list;
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
            << rank0.int_attribute("/optimizer", "step") << "\nlr schedule: " << rank0.read_text("/lr_schedule")
            << "\n";
  const auto ledger = nlohmann::json::parse(rank0.read_text("/data/ledger"));
  std::cout << "data ledger: step " << ledger.value("step", -1) << ", next sample " << ledger.value("next_sample", -1)
            << "\n";
  for (const auto& s : ledger.value("sources", nlohmann::json::array())) {
    std::cout << "  " << s.value("name", "?") << ": epoch " << s.value("epoch", -1) << ", position "
              << s.value("position", -1) << ", consumed " << s.value("consumed", -1) << ", skipped "
              << s.value("skipped", -1) << "\n";
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

// The same as inspect_checkpoint, as JSON. The text values that hold JSON (lr schedule, data ledger) are
// embedded as JSON, not as strings.
nlohmann::json checkpoint_json(const std::string& dir) {
  const checkpoint::Manifest m = checkpoint::verify_checkpoint_dir(dir);  // throws, naming the damaged file
  nlohmann::json files = nlohmann::json::array();
  for (const auto& f : m.files) {
    files.push_back({{"name", f.name},
                     {"bytes", f.bytes},
                     {"sha256", f.sha256},
                     {"rank", f.rank >= 0 ? nlohmann::json(f.rank) : nlohmann::json(nullptr)}});
  }
  const checkpoint::H5Reader rank0(dir + "/" + m.rank_file(0)->name);
  const std::string lr_schedule = rank0.read_text("/lr_schedule");
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& f : m.files) {
    if (f.rank < 0) continue;
    const checkpoint::H5Reader file(dir + "/" + f.name);
    for (const char* group : {"/model", "/optimizer/state", "/rng"}) {
      for (const auto& name : file.datasets_under(group)) {
        const checkpoint::RawTensor t = file.read_tensor(std::string(group) + "/" + name);
        tensors.push_back({{"file", f.name},
                           {"rank", f.rank},
                           {"group", group},
                           {"name", name},
                           {"dtype", checkpoint::dtype_name(t.dtype)},
                           {"shape", t.shape},
                           {"global_shape", t.global_shape},
                           {"offset", t.offset}});
      }
    }
  }
  return {
      {"kind", "checkpoint"},
      {"dir", dir},
      {"verified", true},
      {"step", m.step},
      {"keel_version", m.keel_version},
      {"created", m.created},
      {"run_id", m.run_id},
      {"layout", {{"dp", m.layout.dp}, {"tp", m.layout.tp}, {"pp", m.layout.pp}}},
      {"config_hash", m.config_hash},
      {"files", files},
      {"lineage", lineage_json(checkpoint::parse_lineage(m.lineage, dir + "/manifest.json"))},
      {"optimizer",
       {{"name", rank0.string_attribute("/optimizer", "name")}, {"step", rank0.int_attribute("/optimizer", "step")}}},
      {"lr_schedule", nlohmann::json::parse(lr_schedule, nullptr, /*allow_exceptions=*/false).is_discarded()
                          ? nlohmann::json(lr_schedule)
                          : nlohmann::json::parse(lr_schedule)},
      {"data_ledger", nlohmann::json::parse(rank0.read_text("/data/ledger"))},
      {"tensors", tensors}};
}

nlohmann::json run_json(const std::string& dir) {
  nlohmann::json j{{"kind", "run"}, {"dir", dir}};
  j.update(metrics_json(summarize_metrics(dir + "/metrics.h5")));
  j["lineage"] = fs::exists(dir + "/lineage.json") ? lineage_json(read_run_lineage(dir)) : nlohmann::json(nullptr);
  const CheckpointList checkpoints = list_checkpoints(dir);
  j["checkpoints"] = checkpoints_json(checkpoints);
  j["latest_pointer_error"] =
      checkpoints.latest_error.empty() ? nlohmann::json(nullptr) : nlohmann::json(checkpoints.latest_error);
  return j;
}

}  // namespace

int cmd_inspect(const Args& args) {
  Args dirs;
  po::options_description options("keel inspect RUN_DIR | CKPT_DIR | RUN_DIR RUN_DIR... [--json]");
  // clang-format off
  options.add_options()
      ("json", "print one JSON object instead of text (docs/cli.md)")
      ("help", "show this help");
  // clang-format on
  const auto vm = parse_args(args, options, "inspect", &dirs);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (dirs.empty())
    throw std::runtime_error("expected RUN_DIR, CKPT_DIR or several RUN_DIRs (see keel inspect --help)");
  const bool json = vm.count("json") > 0;
  if (json) metrics::setup_logging();  // any log line to stderr: stdout holds the JSON object only
  if (dirs.size() > 1) {
    std::vector<checkpoint::Lineage> runs;
    for (const auto& dir : dirs) runs.push_back(read_run_lineage(dir));
    if (json) {
      nlohmann::json list = nlohmann::json::array();
      for (size_t i = 0; i < runs.size(); ++i) list.push_back({{"dir", dirs[i]}, {"lineage", lineage_json(runs[i])}});
      print_json({{"kind", "lineage"}, {"runs", list}});
      return 0;
    }
    std::cout << "lineage of " << runs.size() << " runs:\n" << checkpoint::format_lineage_tree(runs);
    return 0;
  }
  const std::string dir = dirs[0];
  if (checkpoint::names_checkpoint_dir(dir)) {
    if (json) {
      print_json(checkpoint_json(dir));
      return 0;
    }
    return inspect_checkpoint(dir);
  }
  const std::string metrics_path = dir + "/metrics.h5";
  if (!fs::exists(metrics_path))
    throw std::runtime_error(dir + " is not a Keel run dir: " + metrics_path + " not found");
  if (json) {
    print_json(run_json(dir));
    return 0;
  }
  std::cout << "run dir: " << dir << "\n";
  print_metrics_summary(summarize_metrics(metrics_path));
  if (fs::exists(dir + "/lineage.json")) print_lineage(read_run_lineage(dir));
  print_checkpoints(list_checkpoints(dir));
  return 0;
}

}  // namespace keel::cli

// Why: see trainer.h. Read top to bottom: setup, then the loop, then one step stage by stage. Every stage that
// DESIGN.md names as a hook calls the plugin host there, in this order: data mixture (step start) -> batch ->
// loss -> grads (norms, clipping) -> grad transforms -> step decision (spike handler) -> optimizer step ->
// step end (metrics, observers). Checkpoints, rollbacks and plugin swaps happen between steps.
#include "core/train/trainer.h"

#include <atomic>
#include <chrono>
#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include <unistd.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/sha256.h"
#include "core/checkpoint/training_state.h"
#include "core/data/mixture.h"
#include "core/metrics/hdf5_handle.h"
#include "core/metrics/metrics_writer.h"
#include "core/metrics/progress.h"
#include "core/model/llama.h"
#include "core/optim/schedule.h"
#include "core/plugin_host/plugin_host.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;

std::atomic<bool> g_stop_requested{false};

// First signal: stop at the next step boundary (after saving a checkpoint). Second: the user insists; leave now
// (a checkpoint being written stays a .tmp directory and is never loaded).
extern "C" void on_stop_signal(int signal) {
  if (g_stop_requested.exchange(true)) {
    static const char message[] = "\nkeel: second stop signal: exiting now without a checkpoint\n";
    (void)!::write(2, message, sizeof(message) - 1);
    ::_exit(128 + signal);
  }
}

std::vector<float> to_float_vector(const torch::Tensor& t) {
  torch::Tensor cpu = t.to(torch::kCPU, torch::kFloat).contiguous();
  return std::vector<float>(cpu.data_ptr<float>(), cpu.data_ptr<float>() + cpu.numel());
}

constexpr int64_t kMaxRollbacks = 100;  // a spike handler that keeps rolling back is a bug, not a recovery

}  // namespace

void install_stop_signal_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

bool stop_requested() { return g_stop_requested.load(); }

// What one step produced, for the loop (the plugins saw `ctx`).
struct Trainer::StepRecord {
  sdk::StepContext ctx;
  sdk::Decision decision;  // the final decision (built-in non-finite check or the spike handler's)
  std::string decided_by;  // "keel" or the spike handler's name
  double step_time_s = 0.0;
  bool updated() const { return decision.action == sdk::Decision::Action::kContinue; }
};

struct Trainer::State {
  Config config;
  RunPaths paths;
  torch::Device device{torch::kCPU};
  torch::ScalarType compute_dtype = torch::kFloat;
  model::Llama model{nullptr};
  std::vector<optim::NamedParameter> params;  // fp32 masters, model order
  std::vector<sdk::Param> plugin_params;      // the same tensors, as plugins see them
  std::vector<std::string> tensor_names;
  std::unique_ptr<plugin_host::PluginHost> plugins;
  std::unique_ptr<data::DataLoader> loader;
  std::unique_ptr<metrics::MetricsWriter> metrics;
  int64_t tokens_seen = 0;
  // An LR factor requested by a spike handler: LR x lr_factor while step < lr_factor_until (checkpointed).
  double lr_factor = 1.0;
  int64_t lr_factor_until = -1;
  int64_t rollbacks = 0;
  checkpoint::Lineage lineage;
  std::unique_ptr<checkpoint::CheckpointStore> checkpoints;
  std::string last_checkpoint;

  std::string control_dir() const { return paths.root + "/control"; }

  // Runs `hook` on plugin `p` with ctx's output channels pointed at p (metrics "<plugin>.<name>", events
  // "[<plugin>] text"); an exception names the plugin, its slot and the step.
  template <typename Hook>
  auto call(plugin_host::LoadedPlugin& p, sdk::StepContext& ctx, Hook&& hook) -> decltype(hook(*p.object)) {
    const std::string name = p.name();
    const int64_t step = ctx.step;
    ctx.metric = [this, name, step](const std::string& metric, double value) {
      metrics->scalar(step, name + "." + metric, value);
    };
    ctx.event = [this, name, step](const std::string& kind, const std::string& text) {
      metrics->event(step, kind, "[" + name + "] " + text);
    };
    try {
      return hook(*p.object);
    } catch (const std::exception& e) {
      throw plugin_host::PluginError("plugin " + name + " (" + p.slot + ") failed at step " + std::to_string(step) +
                                     ": " + e.what());
    }
  }
};

Trainer::Trainer(Config config, RunPaths paths, std::unique_ptr<data::DataLoader> loader, checkpoint::Lineage lineage)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.config = std::move(config);
  s.paths = std::move(paths);
  s.lineage = std::move(lineage);
  s.checkpoints = std::make_unique<checkpoint::CheckpointStore>(s.paths.checkpoints());
  const Config& c = s.config;
  // LibTorch's default here is 1 thread on a 2-core machine; use every CPU unless told otherwise.
  const int64_t threads = c.train.threads > 0 ? c.train.threads : std::max(1u, std::thread::hardware_concurrency());
  torch::set_num_threads(static_cast<int>(threads));
  if (c.train.device == "cuda") {
    TORCH_CHECK(torch::cuda::is_available(), "train.device = cuda but no CUDA device is available to this build");
    s.device = torch::Device(torch::kCUDA, 0);
  }
  s.compute_dtype = c.train.precision == "bf16-mixed" ? torch::kBFloat16 : torch::kFloat;

  s.loader = std::move(loader);
  TORCH_CHECK(s.loader && s.loader->global_batch() == c.global_batch(), "trainer needs a data loader for the global batch");

  // LibTorch seeds its default generators nondeterministically; seed them so that anything random in a step
  // (now or in a plugin) is reproducible. Their state is saved in checkpoints and restored on resume.
  torch::manual_seed(c.train.seed);
  s.model = model::Llama(c.model);
  s.model->init_weights(c.train.seed);
  s.model->to(s.device);
  for (const auto& item : s.model->named_parameters()) {
    const bool decay = item.value().dim() >= 2;  // matrices decay; norm weights and biases do not
    s.params.push_back({item.key(), item.value(), decay});
    s.plugin_params.push_back({item.key(), item.value(), decay});
    s.tensor_names.push_back(item.key());
  }
  s.plugins = std::make_unique<plugin_host::PluginHost>(c);
  s.plugins->optimizer().object->bind(s.plugin_params);

  s.metrics = std::make_unique<metrics::MetricsWriter>(s.paths.metrics_h5(), metrics::OpenMode::kCreate, flatten(c),
                                                       c.metrics.per_tensor ? s.tensor_names : std::vector<std::string>{},
                                                       c.metrics.flush_every);
  spdlog::info("model: {} layers, d_model {}, {} heads ({} kv), vocab {}, seq_len {}: {:.2f}M parameters ({:.2f}M non-embedding)",
               c.model.layers, c.model.d_model, c.model.heads, c.model.kv_heads, c.model.vocab, c.model.seq_len,
               s.model->num_parameters() / 1e6, s.model->num_non_embedding_parameters() / 1e6);
  spdlog::info("batch: {} x {} micro-batches = {} sequences = {} tokens per step; precision {}; device {}",
               c.train.micro_batch, c.train.grad_accum, c.global_batch(), c.tokens_per_step(), c.train.precision,
               c.train.device);
}

Trainer::~Trainer() = default;

TrainSummary Trainer::train() {
  State& s = *state_;
  TrainSummary summary;
  summary.metrics_path = s.paths.metrics_h5();
  checkpoint::write_file_atomically(s.paths.lineage_json(), checkpoint::lineage_to_json(s.lineage));
  s.metrics->event(s.loader->step(), "run_start", "steps " + std::to_string(s.config.train.steps) + ", " +
                                                      s.lineage.kind() + " run " + s.lineage.run_id);
  if (s.loader->step() >= s.config.train.steps) {
    spdlog::warn("nothing to do: the run is already at step {} and train.steps = {} (set train.steps higher)",
                 s.loader->step(), s.config.train.steps);
  }
  metrics::ThroughputMeter meter;

  for (int64_t step = s.loader->step(); step < s.config.train.steps; ++step) {
    const Config& c = s.config;
    const StepRecord r = train_step(step);
    const sdk::StepContext& ctx = r.ctx;
    if (summary.steps_run == 0) summary.first_loss = ctx.loss;
    ++summary.steps_run;
    summary.last_step = step;
    summary.last_loss = ctx.loss;
    meter.update(r.step_time_s, static_cast<double>(ctx.tokens));
    if ((step + 1) % c.train.log_every == 0 || step + 1 == c.train.steps || !r.updated())
      spdlog::info(metrics::format_progress({step + 1, c.train.steps, ctx.loss, ctx.grad_norm, ctx.lr,
                                             meter.tokens_per_s(), meter.eta_s(c.train.steps - step - 1),
                                             !r.updated()}));
    // Step boundary: decisions that leave the straight path, then signals, checkpoints and swap requests.
    if (r.decision.action == sdk::Decision::Action::kRollback) {
      step = roll_back(step, r) - 1;  // the loop's ++step continues at the checkpoint's step
      continue;
    }
    if (r.decision.action == sdk::Decision::Action::kStop) {
      summary.stopped_by_plugin = true;
      spdlog::warn("step {}: {} stopped the run: {}", step, r.decided_by, r.decision.reason);
      save_checkpoint("stopped by " + r.decided_by);
      break;
    }
    if (stop_requested()) {
      summary.stopped_by_signal = true;
      s.metrics->event(step, "stop", "stop signal received: checkpoint and exit after step " + std::to_string(step));
      spdlog::warn("stop signal received: saving a checkpoint after step {} and stopping", step);
      save_checkpoint("stop signal");
      break;
    }
    const bool last = step + 1 == c.train.steps;
    const bool due = c.checkpoint.every > 0 && (step + 1) % c.checkpoint.every == 0;
    if (due || (last && c.checkpoint.at_end)) save_checkpoint(last ? "end of run" : "every " + std::to_string(c.checkpoint.every));
    if (!last) apply_control_requests();
  }
  s.metrics->event(summary.last_step, "run_end", "steps run " + std::to_string(summary.steps_run));
  s.metrics->flush();
  summary.last_checkpoint = s.last_checkpoint;
  return summary;
}

std::string Trainer::save_checkpoint(const std::string& reason) {
  State& s = *state_;
  const Config& c = s.config;
  const int64_t step = s.loader->step();  // steps completed
  if (s.checkpoints->exists(step)) return s.paths.checkpoints() + "/" + checkpoint::step_dir_name(step);
  const auto start = std::chrono::steady_clock::now();

  checkpoint::TrainingState st;
  st.step = step;
  st.tokens_seen = s.tokens_seen;
  for (const auto& p : s.params) st.model.emplace_back(p.name, p.param.detach());
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  const sdk::PluginState optimizer_state = optimizer.object->save_state();
  st.optimizer_name = optimizer.name();
  st.optimizer_json = optimizer_state.json;
  st.optimizer_step = sdk::json_int(optimizer_state.json, "step", 0);
  st.optimizer = optimizer_state.tensors;
  st.lr_schedule = nlohmann::json{{"kind", "warmup_cosine"},
                                  {"lr", c.optim.lr},
                                  {"min_lr", c.optim.min_lr},
                                  {"warmup_steps", c.optim.warmup_steps},
                                  {"decay_steps", c.lr_decay_steps()},
                                  {"next_step", step},
                                  {"lr_factor", s.lr_factor},
                                  {"lr_factor_until", s.lr_factor_until},
                                  {"lr_schedule_plugin", c.plugins.lr_schedule}}
                       .dump();
  for (plugin_host::LoadedPlugin* p : s.plugins->all()) {
    if (p == &optimizer) continue;
    sdk::PluginState ps = p->object->save_state();
    st.plugins.push_back({p->slot, p->name(), p->description.version, ps.json, ps.tensors});
  }
  checkpoint::capture_rng(st);
  st.data_ledger = s.loader->state().dump();
  st.config_ini = to_ini(c);
  st.lineage = checkpoint::lineage_to_json(s.lineage);

  const std::string tmp = s.checkpoints->begin(step);
  checkpoint::write_rank_file(tmp + "/" + checkpoint::rank_file_name(0), st, {0, 1});
  {
    std::ofstream out(tmp + "/config.ini", std::ios::binary);
    out << st.config_ini;
    if (!out) throw checkpoint::CheckpointError(tmp + "/config.ini: write failed");
  }
  checkpoint::Manifest manifest;
  manifest.keel_version = KEEL_VERSION;
  manifest.created = metrics::detail::utc_now_iso8601();
  manifest.run_id = s.lineage.run_id;
  manifest.config_hash = checkpoint::sha256_hex(st.config_ini);
  for (const auto& [key, value] : flatten(c)) {
    if (key.rfind("model.", 0) == 0) manifest.model[key] = value;
  }
  manifest.data_fingerprint = s.loader->fingerprint().dump();
  manifest.lineage = st.lineage;
  const std::string dir = s.checkpoints->commit(step, manifest, {{checkpoint::rank_file_name(0), 0}, {"config.ini", -1}});
  const std::vector<std::string> pruned = s.checkpoints->prune(c.checkpoint.keep_last, c.checkpoint.milestone_every);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.last_checkpoint = dir;
  s.metrics->event(step, "checkpoint", dir + " (" + reason + ")");
  for (const auto& p : pruned) s.metrics->event(step, "checkpoint_pruned", p);
  spdlog::info("checkpoint {} saved in {:.2f} s ({}){}", dir, seconds, reason,
               pruned.empty() ? "" : fmt::format("; pruned {}", pruned.size()));
  return dir;
}

void Trainer::restore(const checkpoint::TrainingState& st, bool allow_data_change) {
  State& s = *state_;
  const std::vector<std::string> notes = apply_state(st, allow_data_change, /*restore_plugins=*/true);
  for (const auto& note : notes) s.lineage.notes.push_back(note);
  for (const auto& change : s.loader->adopt_config(s.config)) s.lineage.notes.push_back("data: " + change);
  s.metrics->event(st.step, "resume", "from " + s.lineage.parent_checkpoint + " (" + s.lineage.kind() + ")");
  for (const auto& note : s.lineage.notes) s.metrics->event(st.step, "lineage", note);
  spdlog::info("resumed at step {} ({} tokens seen) from {}", st.step, st.tokens_seen, s.lineage.parent_checkpoint);
}

std::vector<std::string> Trainer::apply_state(const checkpoint::TrainingState& st, bool allow_data_change,
                                              bool restore_plugins) {
  using checkpoint::CheckpointError;
  State& s = *state_;
  std::vector<std::string> notes;
  // 1. Check what can be checked before anything changes: model tensors by name, shape and dtype; the ledger.
  auto find = [](const checkpoint::NamedTensors& list, const std::string& name) -> const torch::Tensor* {
    for (const auto& [n, t] : list) {
      if (n == name) return &t;
    }
    return nullptr;
  };
  if (st.model.size() != s.params.size()) {
    throw CheckpointError("checkpoint has " + std::to_string(st.model.size()) + " model tensors, the model has " +
                          std::to_string(s.params.size()));
  }
  for (const auto& p : s.params) {
    const torch::Tensor* t = find(st.model, p.name);
    if (!t) throw CheckpointError("checkpoint has no tensor '" + p.name + "'");
    if (t->sizes() != p.param.sizes()) {
      throw CheckpointError("checkpoint tensor '" + p.name + "' has shape " + c10::str(t->sizes()) +
                            ", the model needs " + c10::str(p.param.sizes()));
    }
    if (t->scalar_type() != torch::kFloat) {
      throw CheckpointError("checkpoint tensor '" + p.name + "' is " + c10::toString(t->scalar_type()) +
                            ", expected float32 (fp32 master weights)");
    }
  }
  const nlohmann::json ledger = nlohmann::json::parse(st.data_ledger, nullptr, /*allow_exceptions=*/false);
  if (ledger.is_discarded() || !ledger.is_object() || ledger.value("step", int64_t{-1}) != st.step) {
    throw CheckpointError("checkpoint data ledger is malformed or not at step " + std::to_string(st.step));
  }
  const nlohmann::json schedule = nlohmann::json::parse(st.lr_schedule, nullptr, /*allow_exceptions=*/false);
  if (schedule.is_discarded() || !schedule.is_object()) throw CheckpointError("checkpoint lr_schedule is malformed");

  // 2. The optimizer: its own state if it is the same plugin, otherwise it adopts what it can by name.
  torch::NoGradGuard no_grad;
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  try {
    if (st.optimizer_name == optimizer.name()) {
      optimizer.object->load_state({st.optimizer_json, st.optimizer});
    } else {
      for (const auto& line : optimizer.object->adopt_state(st.optimizer))
        notes.push_back("optimizer " + st.optimizer_name + " -> " + optimizer.name() + ": " + line);
    }
  } catch (const std::exception& e) {
    throw CheckpointError("optimizer " + optimizer.name() + " cannot load the checkpoint's " + st.optimizer_name +
                          " state: " + e.what());
  }

  // 3. Weights, data position, RNG, counters.
  for (auto& p : s.params) p.param.copy_(*find(st.model, p.name));
  const nlohmann::json fingerprint_now = s.loader->fingerprint();
  s.loader->load_state(ledger, allow_data_change);
  if (allow_data_change && ledger.value("fingerprint", nlohmann::json()) != fingerprint_now) {
    notes.push_back("data changed (allowed by --allow-data-change): checkpoint data " +
                    ledger.value("fingerprint", nlohmann::json()).dump() + ", now " + fingerprint_now.dump());
  }
  s.tokens_seen = st.tokens_seen;
  s.lr_factor = schedule.value("lr_factor", 1.0);
  s.lr_factor_until = schedule.value("lr_factor_until", int64_t{-1});
  checkpoint::restore_rng(st);

  // 4. The other plugins' own state, matched by slot and name.
  if (restore_plugins) {
    for (plugin_host::LoadedPlugin* p : s.plugins->all()) {
      if (p == &optimizer) continue;
      bool found = false;
      for (const auto& ps : st.plugins) {
        if (ps.slot != p->slot || ps.name != p->name()) continue;
        found = true;
        try {
          p->object->load_state({ps.json, ps.tensors});
        } catch (const std::exception& e) {
          throw CheckpointError("plugin " + p->name() + " cannot load its checkpointed state: " + e.what());
        }
      }
      if (!found) notes.push_back("plugin " + p->name() + " (" + p->slot + ") starts fresh: not in the checkpoint");
    }
    for (const auto& ps : st.plugins) {
      bool loaded = false;
      for (plugin_host::LoadedPlugin* p : s.plugins->all()) loaded = loaded || (p->slot == ps.slot && p->name() == ps.name);
      if (!loaded) notes.push_back("plugin " + ps.name + " (" + ps.slot + ") of the checkpoint is not loaded now");
    }
  }
  return notes;
}

int64_t Trainer::roll_back(int64_t step, const StepRecord& r) {
  State& s = *state_;
  const sdk::Decision& d = r.decision;
  // The newest valid checkpoint at or before this step (the update of `step` was not applied).
  std::optional<checkpoint::CheckpointEntry> target;
  for (const auto& e : s.checkpoints->list_valid()) {
    if (e.step <= step) target = e;
  }
  if (!target) {
    s.metrics->event(step, "rollback_unavailable", "no checkpoint to roll back to; the update was skipped instead");
    spdlog::warn("step {}: {} asked for a rollback but this run has no checkpoint yet: update skipped", step, r.decided_by);
    return step + 1;
  }
  if (++s.rollbacks > kMaxRollbacks)
    throw std::runtime_error("more than " + std::to_string(kMaxRollbacks) + " rollbacks in one run: stopping");
  const checkpoint::TrainingState st = checkpoint::read_rank_file(target->dir + "/" + checkpoint::rank_file_name(0));
  apply_state(st, /*allow_data_change=*/false, /*restore_plugins=*/false);  // plugins keep their memory
  // The intervention first: the reason can be long, and events keep 511 bytes.
  std::string what = "step " + std::to_string(step) + " -> checkpoint step " + std::to_string(st.step);
  if (!d.skip_data.empty()) {
    s.loader->add_skip(st.step, d.skip_data, "rollback at step " + std::to_string(step) + " by " + r.decided_by);
    what += "; skip " + d.skip_data;
  }
  if (d.reset_optimizer_moments) {
    s.plugins->optimizer().object->reset_moments();
    what += "; optimizer moments reset";
  }
  if (d.lr_factor != 1.0 && d.lr_factor_steps > 0) {
    s.lr_factor = d.lr_factor;
    s.lr_factor_until = st.step + d.lr_factor_steps;
    what += "; LR x" + std::to_string(d.lr_factor) + " until step " + std::to_string(s.lr_factor_until);
  }
  if (plugin_host::LoadedPlugin* handler = s.plugins->spike_handler()) {
    sdk::StepContext ctx;
    ctx.step = st.step;
    s.call(*handler, ctx, [&](sdk::Plugin& p) { p.on_rollback(st.step); });
  }
  what += " (" + r.decided_by + ": " + d.reason + ")";
  s.metrics->event(step, "rollback", what);
  s.lineage.notes.push_back("rollback: " + what);
  checkpoint::write_file_atomically(s.paths.lineage_json(), checkpoint::lineage_to_json(s.lineage));
  spdlog::warn("rollback: {}", what);
  return st.step;
}

void Trainer::apply_control_requests() {
  State& s = *state_;
  std::error_code ec;
  if (!fs::is_directory(s.control_dir(), ec)) return;
  std::vector<std::string> requests;
  for (const auto& item : fs::directory_iterator(s.control_dir(), ec)) {
    if (item.path().extension() == ".request") requests.push_back(item.path().string());
  }
  std::sort(requests.begin(), requests.end());
  for (const auto& path : requests) {
    const int64_t step = s.loader->step();
    std::string outcome;
    try {
      // Lines: "swap SLOT=NAME_OR_PATH", "arg NAME.KEY=VALUE", and optionally "at_step N" (apply at that boundary).
      Config next = s.config;
      std::string slot;
      int64_t at_step = -1;
      std::ifstream in(path);
      std::string verb, value;
      while (in >> verb >> value) {
        if (verb == "swap") {
          const auto eq = value.find('=');
          if (eq == std::string::npos) throw std::runtime_error("swap needs SLOT=NAME_OR_PATH, got '" + value + "'");
          slot = value.substr(0, eq);
          plugin_host::parse_slot(slot);
          apply_override(next, "plugins." + value, path);
        } else if (verb == "arg") {
          apply_override(next, "plugin." + value, path);
        } else if (verb == "at_step") {
          at_step = std::stoll(value);
        } else {
          throw std::runtime_error("unknown request '" + verb + "'");
        }
      }
      if (at_step > step) continue;  // not yet: stays pending
      if (at_step >= 0 && at_step < step)
        throw std::runtime_error("requested for step " + std::to_string(at_step) + ", but the run is already at step " +
                                 std::to_string(step));
      if (slot.empty()) throw std::runtime_error("no swap line");
      std::vector<plugin_host::LoadedPlugin> loaded = plugin_host::PluginHost::load_slot(slot, next);  // may refuse
      save_checkpoint("before swapping " + slot);
      std::string was;
      for (auto* p : s.plugins->all()) {
        if (p->slot == slot) was += (was.empty() ? "" : ",") + p->name();
      }
      std::vector<std::string> lines;
      if (slot == "optimizer") {
        torch::NoGradGuard no_grad;
        loaded.front().object->bind(s.plugin_params);
        lines = loaded.front().object->adopt_state(s.plugins->optimizer().object->save_state().tensors);
      }
      s.plugins->replace(slot, std::move(loaded));
      s.config = next;
      std::string now;
      for (auto* p : s.plugins->all()) {
        if (p->slot == slot) now += (now.empty() ? "" : ",") + p->name();
      }
      outcome = "step " + std::to_string(step) + ": " + slot + " " + (was.empty() ? "(none)" : was) + " -> " +
                (now.empty() ? "(none)" : now) + " (keel control)";
      for (const auto& l : lines) outcome += "; " + l;
      s.metrics->event(step, "plugin_swap", outcome);
      s.lineage.notes.push_back("plugin swap at " + outcome);
      checkpoint::write_file_atomically(s.paths.lineage_json(), checkpoint::lineage_to_json(s.lineage));
      spdlog::info("plugin swap: {}", outcome);
      fs::rename(path, path.substr(0, path.size() - 8) + ".done", ec);
    } catch (const std::exception& e) {
      outcome = e.what();
      s.metrics->event(step, "plugin_swap_refused", outcome);
      spdlog::error("swap request {} refused; the run keeps its plugins: {}", path, outcome);
      std::ofstream(path.substr(0, path.size() - 8) + ".refused") << outcome << "\n";
      fs::remove(path, ec);
    }
  }
}

Trainer::StepRecord Trainer::train_step(int64_t step) {
  State& s = *state_;
  const Config& c = s.config;
  const auto start = std::chrono::steady_clock::now();
  StepRecord r;
  sdk::StepContext& ctx = r.ctx;
  ctx.step = step;
  ctx.total_steps = c.train.steps;
  ctx.tokens_before = s.tokens_seen;
  ctx.tensor_names = s.tensor_names;

  // 0. step start: the data mixture plugin may change the weights from this step on.
  if (plugin_host::LoadedPlugin* mixture = s.plugins->data_mixture()) {
    const std::string weights = s.call(*mixture, ctx, [&](sdk::Plugin& p) {
      return p.mixture_at(step, s.loader->source_names());
    });
    if (!weights.empty()) {
      const auto wanted = data::parse_weights(weights, s.loader->source_names(), "plugin " + mixture->name());
      const auto current = s.loader->weights_at(step);
      double sum = 0.0;
      for (double w : wanted) sum += w;
      bool same = sum > 0.0;
      for (size_t i = 0; same && i < wanted.size(); ++i) same = std::abs(wanted[i] / sum - current[i]) < 1e-12;
      if (!same) s.loader->set_mixture(step, weights, "plugin " + mixture->name());
    }
  }
  ctx.base_lr = optim::warmup_cosine_lr(step, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.lr_decay_steps());
  ctx.lr = ctx.base_lr;
  if (plugin_host::LoadedPlugin* schedule = s.plugins->lr_schedule())
    ctx.lr = s.call(*schedule, ctx, [&](sdk::Plugin& p) { return p.learning_rate(ctx, ctx.base_lr); });
  if (step < s.lr_factor_until) ctx.lr *= s.lr_factor;

  // 1. batch: the data plan of this step is a pure function of (seed, data config, ledger, step).
  data::BatchPlan plan = s.loader->plan_next();
  TORCH_CHECK(plan.step == step, "data plan is at step ", plan.step, " but the trainer is at step ", step);
  for (const auto& sample : plan.samples)
    ctx.batch.push_back({s.loader->source_names().at(sample.source), sample.sample_id, sample.epoch, sample.chunk});
  torch::Tensor window = s.loader->tokens(plan, 0, c.global_batch()).to(s.device);  // [B, T+1] int64
  ctx.tokens = window.size(0) * (window.size(1) - 1);

  // 2. loss: forward + backward over micro-batches, fp32 gradients accumulated in the master weights.
  for (auto& p : s.params) p.param.mutable_grad() = torch::Tensor();
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(s.device));
  torch::Tensor z_loss_sum = torch::zeros_like(loss_sum);
  for (int64_t micro = 0; micro < c.train.grad_accum; ++micro) {
    torch::Tensor micro_window = window.narrow(0, micro * c.train.micro_batch, c.train.micro_batch);  // [b, T+1]
    model::CrossEntropyParts parts = s.model->loss(micro_window, s.compute_dtype);
    (parts.loss / static_cast<double>(c.train.grad_accum)).backward();
    loss_sum += parts.nll.detach();
    z_loss_sum += parts.z_loss.detach();
  }

  // 3. grads: per-tensor norms and the global norm, fetched to the host once per step; then clipping.
  torch::Tensor tensor_grad_norms = optim::per_tensor_grad_norms(s.params);  // [n]
  torch::Tensor scalars = torch::stack({loss_sum / static_cast<double>(c.train.grad_accum),
                                        z_loss_sum / static_cast<double>(c.train.grad_accum),
                                        optim::global_norm(tensor_grad_norms).to(torch::kFloat)})
                              .to(torch::kCPU, torch::kDouble);
  ctx.loss = scalars[0].item<double>();
  ctx.z_loss = scalars[1].item<double>();
  ctx.grad_norm = scalars[2].item<double>();
  if (c.metrics.per_tensor) ctx.tensor_grad_norms = to_float_vector(tensor_grad_norms);
  ctx.clip_factor = optim::clip_grads_by_global_norm(s.params, ctx.grad_norm, c.optim.grad_clip);

  torch::NoGradGuard no_grad;  // every hook below changes tensors in place
  // 4. grad transforms, in chain order.
  for (auto& transform : s.plugins->grad_transforms())
    s.call(transform, ctx, [&](sdk::Plugin& p) { p.transform_grads(ctx, s.plugin_params); });

  // 5. step decision: a non-finite loss or gradient never reaches the weights; then the spike handler.
  if (!std::isfinite(ctx.loss) || !std::isfinite(ctx.grad_norm)) {
    r.decision = sdk::Decision::skip_update("non-finite loss " + std::to_string(ctx.loss) + " or grad norm " +
                                            std::to_string(ctx.grad_norm));
    r.decided_by = "keel";
  } else if (plugin_host::LoadedPlugin* handler = s.plugins->spike_handler()) {
    r.decision = s.call(*handler, ctx, [&](sdk::Plugin& p) { return p.decide(ctx); });
    r.decided_by = handler->name();
    if (r.decision.action != sdk::Decision::Action::kRollback && r.decision.lr_factor != 1.0 &&
        r.decision.lr_factor_steps > 0) {
      s.lr_factor = r.decision.lr_factor;
      s.lr_factor_until = step + r.decision.lr_factor_steps;
      ctx.lr = ctx.lr * r.decision.lr_factor;
      s.metrics->event(step, "lr_factor", "[" + r.decided_by + "] LR x" + std::to_string(r.decision.lr_factor) +
                                              " until step " + std::to_string(s.lr_factor_until) + ": " + r.decision.reason);
    }
  }
  if (r.decision.action != sdk::Decision::Action::kContinue &&
      r.decision.action != sdk::Decision::Action::kRollback) {  // a rollback logs its own event in roll_back()
    static const char* const kinds[] = {"continue", "skip", "rollback", "stop"};
    const char* kind = kinds[static_cast<int>(r.decision.action)];
    s.metrics->event(step, kind, "[" + r.decided_by + "] " + r.decision.reason);
    spdlog::warn("step {}: {} by {}: {}", step, kind, r.decided_by, r.decision.reason);
  }

  // 6. optimizer step.
  if (r.updated()) s.call(s.plugins->optimizer(), ctx, [&](sdk::Plugin& p) { p.step(ctx); });

  // 7. step end: metrics row, then every plugin's on_step_end (observers).
  s.tokens_seen += ctx.tokens;
  r.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  metrics::StepRow row;
  row.step = step;
  row.loss = ctx.loss;
  row.grad_norm = ctx.grad_norm;
  row.lr = ctx.lr;
  row.tokens = s.tokens_seen;
  row.tokens_per_s = ctx.tokens / std::max(r.step_time_s, 1e-9);
  row.step_time_s = r.step_time_s;
  row.skipped = !r.updated();
  row.tensor_grad_norms = ctx.tensor_grad_norms;
  if (c.metrics.per_tensor) row.tensor_param_norms = to_float_vector(optim::per_tensor_param_norms(s.params));
  s.metrics->append(row);
  for (plugin_host::LoadedPlugin* p : s.plugins->all())
    s.call(*p, ctx, [&](sdk::Plugin& plugin) { plugin.on_step_end(ctx); });
  return r;
}

}  // namespace keel::train

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
#include <set>
#include <sstream>
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
#include "core/checkpoint/resharding.h"
#include "core/model/llama.h"
#include "core/model/sharding.h"
#include "core/optim/schedule.h"
#include "core/optim/zero.h"
#include "core/parallel/grad_reducer.h"
#include "core/parallel/pipeline.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/control.h"
#include "core/train/plugin_values.h"
#include "kernels/dispatch.h"
#include "kernels/optimizer_step.h"

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

constexpr int64_t kMaxRollbacks = 100;  // a spike handler that keeps rolling back is a bug, not a recovery

// Test-only fault injection (docs/testing.md): KEEL_TEST_FAULT="nan_grad:RANK:STEP" puts a NaN into that rank's
// gradients before the per-rank check; "save_fail:RANK:STEP" makes that rank's checkpoint write fail.
struct InjectedFault {
  std::string kind;
  int64_t rank = -1, step = -1;
  bool at(const std::string& k, int64_t r, int64_t st) const { return kind == k && rank == r && step == st; }
};
InjectedFault injected_fault() {
  InjectedFault f;
  const char* spec = std::getenv("KEEL_TEST_FAULT");
  if (!spec || !*spec) return f;
  char kind[32] = {0};
  long long rank = -1, step = -1;
  if (std::sscanf(spec, "%31[a-z_]:%lld:%lld", kind, &rank, &step) == 3) f = {kind, rank, step};
  return f;
}

// A decision crosses ranks as JSON (rank 0's is the one every rank applies).
std::string decision_to_json(const sdk::Decision& d, const std::string& decided_by) {
  return nlohmann::json{{"action", static_cast<int>(d.action)}, {"reason", d.reason}, {"skip_data", d.skip_data},
                        {"reset_moments", d.reset_optimizer_moments}, {"lr_factor", d.lr_factor},
                        {"lr_factor_steps", d.lr_factor_steps}, {"by", decided_by}}
      .dump();
}
sdk::Decision decision_from_json(const std::string& text, std::string& decided_by) {
  const nlohmann::json j = nlohmann::json::parse(text);
  sdk::Decision d;
  d.action = static_cast<sdk::Decision::Action>(j.at("action").get<int>());
  d.reason = j.at("reason").get<std::string>();
  d.skip_data = j.at("skip_data").get<std::string>();
  d.reset_optimizer_moments = j.at("reset_moments").get<bool>();
  d.lr_factor = j.at("lr_factor").get<double>();
  d.lr_factor_steps = j.at("lr_factor_steps").get<int64_t>();
  decided_by = j.at("by").get<std::string>();
  return d;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    out.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

}  // namespace

void install_stop_signal_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

bool stop_requested() { return g_stop_requested.load(); }

// What the ranks agree on at each step boundary, in order of precedence.
enum class BoundaryStatus { kContinue = 0, kStop = 1, kFailed = 2 };

// What one step produced, for the loop (the plugins saw `ctx`).
struct Trainer::StepRecord {
  sdk::StepContext ctx;
  sdk::Decision decision;  // the final decision (built-in non-finite check or the spike handler's)
  std::string decided_by;  // "keel" or the spike handler's name
  double step_time_s = 0.0;
  std::vector<float> tensor_param_norms;  // per tensor, the weights this step's forward used (metrics.per_tensor)
  bool updated() const { return decision.action == sdk::Decision::Action::kContinue; }
};

struct Trainer::State {
  Config config;
  RunPaths paths;
  parallel::ProcessGroups groups;
  torch::Device device{torch::kCPU};
  torch::ScalarType compute_dtype = torch::kFloat;
  model::Llama model{nullptr};
  std::vector<optim::NamedParameter> params;  // this rank's fp32 masters (its TP shards of its stage), model order
  std::vector<model::ShardSpec> specs;        // per entry of params: how it splits over TP
  std::vector<int64_t> global_index;          // per entry of params: its index in tensor_names
  std::vector<sdk::Param> plugin_params;      // the same tensors, as plugins see them
  std::vector<sdk::Param> optimizer_params;   // the ones this rank's optimizer updates (all, or its ZeRO-1 share)
  std::vector<std::string> tensor_names;      // every parameter of the whole model (all stages), model order
  optim::ZeroPartition zero;                  // owner DP rank of each entry of params (parallel.zero = 1)
  std::unique_ptr<parallel::GradReducer> reducer;
  std::unique_ptr<plugin_host::PluginHost> plugins;
  std::unique_ptr<data::DataLoader> loader;
  std::unique_ptr<metrics::MetricsWriter> metrics;  // rank 0 only
  InjectedFault fault;
  int64_t tokens_seen = 0;
  // An LR factor requested by a spike handler: LR x lr_factor while step < lr_factor_until (checkpointed).
  double lr_factor = 1.0;
  int64_t lr_factor_until = -1;
  int64_t rollbacks = 0;
  bool failure_recorded = false;  // record_failure() wrote the run's "error" event
  bool step_updated = false;  // the current step's update is applied and counted (a failure after it can checkpoint)
  checkpoint::Lineage lineage;
  std::unique_ptr<checkpoint::CheckpointStore> checkpoints;
  std::string last_checkpoint;
  at::Tensor placement_index, placement_counted;  // placed_squares(): global index and counted-here flag per param
  at::Tensor zero_scalar;                         // placed_squares(): stands in for an undefined gradient on a GPU

  bool rank0() const { return groups.is_rank0(); }
  bool zero_enabled() const { return config.parallel.zero == 1 && groups.layout.dp() > 1; }
  void event(int64_t step, const std::string& kind, const std::string& text) {
    if (metrics) metrics->event(step, kind, text);
  }
  // A failure that ends the run: an "error" event, flushed if metrics.h5 can still be written (it may be what
  // failed), so that the file says why the run stopped.
  void record_failure(int64_t step, const std::string& text) {
    if (failure_recorded || !metrics) return;
    failure_recorded = true;
    try {
      metrics->event(step, "error", text);
      metrics->flush();
    } catch (const std::exception&) {
    }
  }
  // The newest committed checkpoint, for messages ("" if none).
  std::string newest_checkpoint() const {
    const auto latest = checkpoints->latest_pointer();
    return latest ? *latest : "";
  }
  void write_lineage() {
    if (rank0()) checkpoint::write_file_atomically(paths.lineage_json(), checkpoint::lineage_to_json(lineage));
  }
  void stop_if_weights_not_finite(int64_t step) {
    std::string bad;
    {
      torch::NoGradGuard no_grad;
      for (const auto& p : params) {
        if (!torch::isfinite(p.param).all().item<bool>()) {
          bad = p.name;
          break;
        }
      }
    }
    const std::vector<std::string> all = groups.world->all_gather_strings(bad);
    for (size_t r = 0; r < all.size(); ++r) {
      if (all[r].empty()) continue;
      std::string transforms;
      for (auto& t : plugins->grad_transforms()) transforms += (transforms.empty() ? "" : ", ") + t.name();
      throw std::runtime_error(
          "step " + std::to_string(step) + ": the weights are not finite (" + all[r] +
          (groups.world->single() ? "" : " on " + groups.layout.describe_rank(static_cast<int64_t>(r))) +
          "): an earlier update poisoned them (optimizer " + plugins->optimizer().name() +
          (transforms.empty() ? "" : ", grad transforms " + transforms) + "); the run stops");
    }
  }
  // The boundary status of the whole job: the most severe of every rank's (one collective).
  BoundaryStatus boundary_status(bool failed, bool stop) {
    const BoundaryStatus local = failed ? BoundaryStatus::kFailed : stop ? BoundaryStatus::kStop : BoundaryStatus::kContinue;
    if (groups.world->single()) return local;
    at::Tensor code = torch::full({1}, static_cast<float>(local));
    groups.world->all_reduce(code, parallel::ReduceOp::kMax);
    return static_cast<BoundaryStatus>(static_cast<int>(code.item<float>()));
  }
  // True on every rank if `local` is true on any rank (stop signals, failures).
  bool any_rank(bool local) {
    if (groups.world->single()) return local;
    at::Tensor flag = torch::full({1}, local ? 1.0f : 0.0f);
    groups.world->all_reduce(flag, parallel::ReduceOp::kMax);
    return flag.item<float>() > 0.0f;
  }
  // Throws on every rank (naming the first failing rank) if `error` is non-empty on any rank.
  void agree_or_throw(const std::string& error, const std::string& what) {
    const std::vector<std::string> errors = groups.world->all_gather_strings(error);
    for (size_t r = 0; r < errors.size(); ++r) {
      if (errors[r].empty()) continue;
      throw checkpoint::CheckpointError(what + ": " + groups.layout.describe_rank(static_cast<int64_t>(r)) + ": " + errors[r]);
    }
  }
  // Per-tensor squared norms of `tensors` (this rank's, in params order), placed at their whole-model index in
  // an [n] vector on this rank's device, each element counted once: DP replicas and TP-replicated tensors
  // contribute from one rank only. Summing this vector over the world gives the whole model's squares. No host
  // synchronisation: the caller reads the result once per step, together with everything else.
  at::Tensor placed_squares(const std::vector<at::Tensor>& tensors) {
    const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(device);
    at::Tensor whole = torch::zeros({static_cast<int64_t>(tensor_names.size())}, fp32);  // [n]
    if (tensors.empty() || groups.coords.dp != 0) return whole;
    if (!placement_index.defined()) {
      std::vector<int64_t> index;
      std::vector<float> counted;
      for (size_t i = 0; i < tensors.size(); ++i) {
        index.push_back(global_index[i]);
        counted.push_back(specs[i].sharded() || groups.coords.tp == 0 ? 1.0f : 0.0f);
      }
      placement_index = torch::tensor(index, torch::kLong).to(device);  // [n_local]
      placement_counted = torch::tensor(counted, torch::kFloat).to(device);  // [n_local]
    }
    at::Tensor local;  // [n_local]
    if (device.is_cuda()) {
      // One multi-tensor kernel instead of a reduction per tensor; an undefined gradient counts as a zero (a
      // cached device scalar, so nothing is copied from the host inside the step).
      if (!zero_scalar.defined()) zero_scalar = torch::zeros({}, fp32);
      std::vector<at::Tensor> all;
      for (const auto& t : tensors) all.push_back(t.defined() ? t.detach() : zero_scalar);
      const at::Tensor norms = torch::stack(at::_foreach_norm(all, 2)).to(torch::kFloat);  // [n_local]
      local = norms * norms;
    } else {
      std::vector<at::Tensor> squares;
      for (const auto& t : tensors) squares.push_back(t.defined() ? t.detach().to(torch::kFloat).pow(2).sum() : torch::zeros({}, fp32));
      local = torch::stack(squares);
    }
    whole.index_add_(0, placement_index, local * placement_counted);
    return whole;
  }

  // Runs `hook` on plugin `p` with ctx's output channels pointed at p (metrics "<plugin>.<name>", events
  // "[<plugin>] text"; written by rank 0); an exception names the plugin, its slot and the step.
  template <typename Hook>
  auto call(plugin_host::LoadedPlugin& p, sdk::StepContext& ctx, Hook&& hook) -> decltype(hook(*p.object)) {
    const std::string name = p.name();
    const int64_t step = ctx.step;
    ctx.metric = [this, name, step](const std::string& metric, double value) {
      if (metrics) metrics->scalar(step, name + "." + metric, value);
    };
    ctx.event = [this, name, step](const std::string& kind, const std::string& text) {
      event(step, kind, "[" + name + "] " + text);
    };
    try {
      return hook(*p.object);
    } catch (const std::exception& e) {
      throw plugin_host::PluginError("plugin " + name + " (" + p.slot + ") failed at step " + std::to_string(step) +
                                     (groups.world->single() ? "" : " on " + groups.describe()) + ": " + e.what());
    }
  }
};

Trainer::Trainer(Config config, RunPaths paths, std::unique_ptr<data::DataLoader> loader, checkpoint::Lineage lineage,
                 parallel::ProcessGroups groups)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.config = std::move(config);
  s.paths = std::move(paths);
  s.lineage = std::move(lineage);
  s.groups = std::move(groups);
  s.fault = injected_fault();
  s.checkpoints = std::make_unique<checkpoint::CheckpointStore>(s.paths.checkpoints());
  const Config& c = s.config;
  const parallel::ProcessGroups& g = s.groups;
  g.layout.require_world_size(g.world->size(), "this job");
  // LibTorch's default here is 1 thread on a 2-core machine; use every CPU unless told otherwise (local ranks
  // share the machine's CPUs).
  const int64_t cpus = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t local_ranks = std::min<int64_t>(g.world_size(), cpus);
  const int64_t threads = c.train.threads > 0 ? c.train.threads : std::max<int64_t>(1, cpus / local_ranks);
  torch::set_num_threads(static_cast<int>(threads));
  if (c.train.device == "cuda") {
    TORCH_CHECK(torch::cuda::is_available(), "train.device = cuda but no CUDA device is available to this build");
    s.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(g.world_info.local_rank % torch::cuda::device_count()));
  }
  s.compute_dtype = c.train.precision == "bf16-mixed" ? torch::kBFloat16 : torch::kFloat;

  s.loader = std::move(loader);
  TORCH_CHECK(s.loader && s.loader->global_batch() == c.global_batch(), "trainer needs a data loader for the global batch");

  // LibTorch seeds its default generators nondeterministically; seed them so that anything random in a step
  // (now or in a plugin) is reproducible: rank r uses train.seed + r. Their state is saved in checkpoints.
  torch::manual_seed(c.train.seed + static_cast<uint64_t>(g.rank));
  const parallel::TensorParallel tp{g.coords.tp, g.layout.tp(), g.layout.tp() > 1 ? g.tp : nullptr};
  const parallel::Layout::StageLayers layers = g.layout.stage_layers(c.model.layers, g.coords.pp);
  s.model = model::Llama(c.model, tp, model::StageSpec{layers.first, layers.count, g.first_stage(), g.last_stage()});
  s.model->init_weights(c.train.seed);  // the same full weights in every layout
  s.model->to(s.device);
  const auto specs = model::shard_specs(*s.model);
  std::string local_names;
  for (const auto& item : s.model->named_parameters()) {
    const bool decay = item.value().dim() >= 2;  // matrices decay; norm weights and biases do not
    s.params.push_back({item.key(), item.value(), decay});
    s.plugin_params.push_back({item.key(), item.value(), decay});
    s.specs.push_back(specs.at(s.specs.size()).second);
    local_names += item.key() + "\n";
  }
  // The whole model's tensor names: stage by stage, as TP rank 0 of DP rank 0 of each stage names them.
  const std::vector<std::string> all_names = g.world->all_gather_strings(local_names);
  for (int64_t stage = 0; stage < g.layout.pp(); ++stage) {
    for (const auto& name : split_lines(all_names.at(g.layout.rank_of({0, 0, stage})))) s.tensor_names.push_back(name);
  }
  for (const auto& p : s.params) {
    const auto it = std::find(s.tensor_names.begin(), s.tensor_names.end(), p.name);
    TORCH_CHECK(it != s.tensor_names.end(), "parameter ", p.name, " of ", g.describe(), " is not in the model's names");
    s.global_index.push_back(it - s.tensor_names.begin());
  }
  // ZeRO-1: each DP rank's optimizer owns a balanced share of this stage's tensors; others get them by broadcast.
  if (s.zero_enabled()) {
    std::vector<int64_t> numels;
    for (const auto& p : s.params) numels.push_back(p.param.numel());
    s.zero = optim::partition_for_zero(numels, g.layout.dp());
    for (int64_t i : s.zero.owned_by(g.coords.dp)) s.optimizer_params.push_back(s.plugin_params.at(i));
  } else {
    s.optimizer_params = s.plugin_params;
  }
  if (g.layout.dp() > 1) {
    std::vector<at::Tensor> tensors;
    for (const auto& p : s.params) tensors.push_back(p.param);
    s.reducer = std::make_unique<parallel::GradReducer>(tensors, g.dp, c.parallel.bucket_mb);
  }
  s.plugins = std::make_unique<plugin_host::PluginHost>(c);
  s.plugins->optimizer().object->bind(s.optimizer_params);

  if (s.rank0()) {
    s.metrics = std::make_unique<metrics::MetricsWriter>(s.paths.metrics_h5(), metrics::OpenMode::kCreate, flatten(c),
                                                         c.metrics.per_tensor ? s.tensor_names : std::vector<std::string>{},
                                                         c.metrics.flush_every);
  }
  spdlog::info("model: {} layers, d_model {}, {} heads ({} kv), vocab {}, seq_len {}: {:.2f}M parameters on this rank",
               c.model.layers, c.model.d_model, c.model.heads, c.model.kv_heads, c.model.vocab, c.model.seq_len,
               s.model->num_parameters() / 1e6);
  spdlog::info("batch: {} sequences = {} tokens per step; {} ({} micro-batches of {} per DP rank{}); precision {}; device {}",
               c.global_batch(), c.tokens_per_step(), g.layout.describe(), c.microbatches_per_rank(), c.rank_micro_batch(),
               g.layout.pp() > 1 ? ", " + c.parallel.schedule + " pipeline" : "", c.train.precision, c.train.device);
}

Trainer::~Trainer() = default;

TrainSummary Trainer::train() {
  State& s = *state_;
  TrainSummary summary;
  summary.metrics_path = s.paths.metrics_h5();
  s.write_lineage();
  s.event(s.loader->step(), "run_start", "steps " + std::to_string(s.config.train.steps) + ", " +
                                                      s.lineage.kind() + " run " + s.lineage.run_id);
  if (s.loader->step() >= s.config.train.steps) {
    spdlog::warn("nothing to do: the run is already at step {} and train.steps = {} (set train.steps higher)",
                 s.loader->step(), s.config.train.steps);
  }
  metrics::ThroughputMeter meter;

  // Any error that ends the run is also an "error" event in metrics.h5 (when it can still be written).
  try {
    for (int64_t step = s.loader->step(); step < s.config.train.steps; ++step) {
      const Config& c = s.config;
      StepRecord r;
      std::string failure;  // this rank failed after the step's update (metrics, log, observers): checkpoint, stop
      try {
        r = train_step(step);
      } catch (const parallel::DistributedError&) {
        throw;
      } catch (const std::exception& e) {
        if (!s.step_updated) {  // mid-step: weights and data position disagree; the newest checkpoint stays
          const std::string newest = s.newest_checkpoint();
          s.record_failure(step, e.what());
          throw std::runtime_error(std::string(e.what()) +
                                   (newest.empty() ? "" : "; the newest checkpoint is " + newest));
        }
        failure = e.what();
      }
      // Every rank learns at the same boundary whether any rank failed after its update or got a stop signal.
      const BoundaryStatus status = s.boundary_status(!failure.empty(), stop_requested());
      if (status == BoundaryStatus::kFailed) fail_after_update(step, failure);
      const sdk::StepContext& ctx = r.ctx;
      if (summary.steps_run == 0) summary.first_loss = ctx.loss;
      ++summary.steps_run;
      summary.last_step = step;
      summary.last_loss = ctx.loss;
      meter.update(r.step_time_s, static_cast<double>(ctx.tokens));
      const bool log_line = (step + 1) % c.train.log_every == 0 || step + 1 == c.train.steps || !r.updated();
      if (log_line && s.rank0())
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
      if (status == BoundaryStatus::kStop) {  // every rank stops after the same step
        summary.stopped_by_signal = true;
        // Steps are numbered from 0; checkpoint step-N holds the state after N steps (a resume starts at step N).
        const std::string name = checkpoint::step_dir_name(step + 1);
        s.event(step, "stop", "stop signal received during step " + std::to_string(step) + ": saving " + name +
                                  " and stopping");
        spdlog::warn("stop signal received during step {}: saving checkpoint {} (a resume starts at step {}) and stopping",
                     step, name, step + 1);
        save_checkpoint("stop signal");
        break;
      }
      const bool last = step + 1 == c.train.steps;
      const bool due = c.checkpoint.every > 0 && (step + 1) % c.checkpoint.every == 0;
      if (due || (last && c.checkpoint.at_end)) save_checkpoint(last ? "end of run" : "every " + std::to_string(c.checkpoint.every));
      if (!last) apply_control_requests();
    }
  } catch (const parallel::DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    s.record_failure(s.loader->step(), e.what());
    throw;
  }
  std::string end = "steps run " + std::to_string(summary.steps_run);
  if (s.device.is_cuda()) {
    const long long peak = kernels::cuda_peak_allocated_bytes(s.device.index());
    end += ", peak CUDA memory " + std::to_string(peak) + " bytes";
    spdlog::info("peak CUDA memory (caching allocator, as torch.cuda.max_memory_allocated): {:.2f} GiB",
                 static_cast<double>(peak) / (1024.0 * 1024.0 * 1024.0));
  }
  s.event(summary.last_step, "run_end", end);
  if (s.metrics) s.metrics->flush();
  summary.last_checkpoint = s.last_checkpoint;
  return summary;
}

void Trainer::fail_after_update(int64_t step, const std::string& failure) {
  State& s = *state_;
  // Which rank failed, and why (the first failing rank's message is the one every rank reports).
  const std::vector<std::string> failures = s.groups.world->all_gather_strings(failure);
  std::string message;
  for (size_t r = 0; r < failures.size() && message.empty(); ++r) {
    if (failures[r].empty()) continue;
    message = (s.groups.world->single() ? "" : s.groups.layout.describe_rank(static_cast<int64_t>(r)) + ": ") + failures[r];
  }
  message = "step " + std::to_string(step) + ": " + message;
  spdlog::error("{}; saving a checkpoint of the state after step {} before stopping", message, step);
  // The update of `step` is applied everywhere, so the state after it is a consistent checkpoint.
  try {
    message += "; saved " + save_checkpoint("stopped by a failure after step " + std::to_string(step));
  } catch (const parallel::DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    const std::string newest = s.newest_checkpoint();
    message += "; the checkpoint could not be saved either (" + std::string(e.what()) + ")" +
               (newest.empty() ? "" : "; the newest checkpoint is " + newest);
  }
  s.record_failure(step, message);
  throw std::runtime_error(message);
}

std::string Trainer::save_checkpoint(const std::string& reason) {
  State& s = *state_;
  const Config& c = s.config;
  const parallel::ProcessGroups& g = s.groups;
  const int64_t step = s.loader->step();  // steps completed
  const std::string final_dir = s.paths.checkpoints() + "/" + checkpoint::step_dir_name(step);
  // Rank 0 owns the directory protocol (begin, commit, prune); every rank writes its own file in between.
  const bool exists = g.world->broadcast_string(s.rank0() && s.checkpoints->exists(step) ? "1" : "0", 0) == "1";
  if (exists) return final_dir;
  const auto start = std::chrono::steady_clock::now();
  std::string tmp, error;
  if (s.rank0()) {
    try {
      tmp = s.checkpoints->begin(step);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  s.agree_or_throw(error, "checkpoint step " + std::to_string(step) + " not started");
  tmp = g.world->broadcast_string(tmp, 0);

  // This rank's file: its shards (model tensors from DP rank 0; TP-replicated ones from TP rank 0 only, so that
  // every element is written once), its optimizer state (all of it, or its ZeRO-1 share), its RNG, and the
  // run's metadata, identical on every rank.
  checkpoint::TrainingState st;
  const std::string rank_file = checkpoint::rank_file_name(g.rank);
  try {
    st.step = step;
    st.tokens_seen = s.tokens_seen;
    auto writes = [&](size_t i) { return s.specs[i].sharded() || g.coords.tp == 0; };
    std::map<std::string, size_t> index_of;
    for (size_t i = 0; i < s.params.size(); ++i) {
      index_of[s.params[i].name] = i;
      if (g.coords.dp != 0 || !writes(i)) continue;
      const auto& p = s.params[i];
      st.model.emplace_back(p.name, p.param.detach());
      st.placement["model/" + p.name] = {model::global_shape(p.param.sizes(), s.specs[i], g.layout.tp()),
                                         model::shard_offset(p.param.sizes(), s.specs[i], g.coords.tp)};
    }
    plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
    const sdk::PluginState optimizer_state = optimizer.object->save_state();
    st.optimizer_name = optimizer.name();
    st.optimizer_json = optimizer_state.json;
    st.optimizer_step = sdk::json_int(optimizer_state.json, "step", 0);
    for (const auto& [name, tensor] : optimizer_state.tensors) {
      // "<param>/<state>": placed like its parameter when it has the parameter's shape.
      const auto slash = name.rfind('/');
      const auto it = slash == std::string::npos ? index_of.end() : index_of.find(name.substr(0, slash));
      if (it == index_of.end()) throw checkpoint::CheckpointError("optimizer state tensor '" + name + "' names no parameter");
      const size_t i = it->second;
      if ((!s.zero_enabled() && g.coords.dp != 0) || !writes(i)) continue;
      st.optimizer.emplace_back(name, tensor);
      if (tensor.sizes() == s.params[i].param.sizes()) {
        st.placement["optimizer/" + name] = {model::global_shape(tensor.sizes(), s.specs[i], g.layout.tp()),
                                             model::shard_offset(tensor.sizes(), s.specs[i], g.coords.tp)};
      }
    }
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
    if (s.fault.at("save_fail", g.rank, step)) throw checkpoint::CheckpointError(tmp + "/" + rank_file + ": injected failure (KEEL_TEST_FAULT)");
    checkpoint::write_rank_file(tmp + "/" + rank_file, st, {g.rank, g.world_size()});
  } catch (const std::exception& e) {
    error = e.what();
  }
  // A file missing on any rank: no rank commits; the previous checkpoint stays the latest.
  const std::vector<std::string> errors = g.world->all_gather_strings(error);
  for (size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty()) continue;
    const auto latest = s.rank0() ? s.checkpoints->latest_pointer() : std::nullopt;
    std::error_code ec;
    if (s.rank0()) std::filesystem::remove_all(tmp, ec);
    throw checkpoint::CheckpointError("checkpoint step " + std::to_string(step) + " was not committed by any rank: " +
                                      g.layout.describe_rank(static_cast<int64_t>(r)) + " could not write its file: " +
                                      errors[r] + (latest ? "; the latest checkpoint is still " + *latest : ""));
  }

  std::string dir;
  if (s.rank0()) {
    try {
      {
        std::ofstream out(tmp + "/config.ini", std::ios::binary);
        out << st.config_ini;
        if (!out) throw checkpoint::CheckpointError(tmp + "/config.ini: write failed");
      }
      checkpoint::Manifest manifest;
      manifest.keel_version = KEEL_VERSION;
      manifest.created = metrics::detail::utc_now_iso8601();
      manifest.run_id = s.lineage.run_id;
      manifest.layout = {g.layout.dp(), g.layout.tp(), g.layout.pp()};
      manifest.config_hash = checkpoint::sha256_hex(st.config_ini);
      for (const auto& [key, value] : flatten(c)) {
        if (key.rfind("model.", 0) == 0) manifest.model[key] = value;
      }
      manifest.data_fingerprint = s.loader->fingerprint().dump();
      manifest.lineage = st.lineage;
      std::vector<std::pair<std::string, int64_t>> files;
      for (int64_t r = 0; r < g.world_size(); ++r) files.emplace_back(checkpoint::rank_file_name(r), r);
      files.emplace_back("config.ini", -1);
      dir = s.checkpoints->commit(step, manifest, files);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  s.agree_or_throw(error, "checkpoint step " + std::to_string(step) + " not committed");
  dir = g.world->broadcast_string(dir, 0);
  const std::vector<std::string> pruned =
      s.rank0() ? s.checkpoints->prune(c.checkpoint.keep_last, c.checkpoint.milestone_every) : std::vector<std::string>{};

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.last_checkpoint = dir;
  s.event(step, "checkpoint", dir + " (" + reason + ")");
  for (const auto& p : pruned) s.event(step, "checkpoint_pruned", p);
  if (s.rank0()) {
    spdlog::info("checkpoint {} saved in {:.2f} s ({}){}", dir, seconds, reason,
                 pruned.empty() ? "" : fmt::format("; pruned {}", pruned.size()));
  }
  return dir;
}

void Trainer::restore(const checkpoint::TrainingState& st, bool allow_data_change) {
  State& s = *state_;
  const std::vector<std::string> notes = apply_state(st, s.lineage.parent_checkpoint, allow_data_change, /*restore_plugins=*/true);
  for (const auto& note : notes) s.lineage.notes.push_back(note);
  for (const auto& change : s.loader->adopt_config(s.config)) s.lineage.notes.push_back("data: " + change);
  s.event(st.step, "resume", "from " + s.lineage.parent_checkpoint + " (" + s.lineage.kind() + ")");
  for (const auto& note : s.lineage.notes) s.event(st.step, "lineage", note);
  spdlog::info("resumed at step {} ({} tokens seen) from {}", st.step, st.tokens_seen, s.lineage.parent_checkpoint);
}

std::vector<std::string> Trainer::apply_state(const checkpoint::TrainingState& st, const std::string& origin,
                                              bool allow_data_change, bool restore_plugins) {
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
  // `st` holds whole tensors (read_full_state); this rank takes its TP shard of each of its stage's parameters.
  const parallel::ProcessGroups& g = s.groups;
  {
    // Name the tensors that do not match, not just their counts.
    std::set<std::string> in_checkpoint, in_model(s.tensor_names.begin(), s.tensor_names.end());
    for (const auto& [name, tensor] : st.model) in_checkpoint.insert(name);
    std::string missing, extra;
    for (const auto& name : s.tensor_names)
      if (!in_checkpoint.count(name)) missing += (missing.empty() ? "" : ", ") + name;
    for (const auto& name : in_checkpoint)
      if (!in_model.count(name)) extra += (extra.empty() ? "" : ", ") + name;
    if (!missing.empty() || !extra.empty()) {
      throw CheckpointError(origin + ": " + (missing.empty() ? "" : "no model tensor " + missing + " in its rank files") +
                            (missing.empty() || extra.empty() ? "" : "; ") +
                            (extra.empty() ? "" : "model tensor " + extra + " is not in this model") + " (checkpoint " +
                            std::to_string(st.model.size()) + " tensors, model " + std::to_string(s.tensor_names.size()) +
                            ")");
    }
  }
  std::vector<torch::Tensor> shards;  // per entry of s.params
  for (size_t i = 0; i < s.params.size(); ++i) {
    const auto& p = s.params[i];
    const torch::Tensor* t = find(st.model, p.name);
    if (!t) throw CheckpointError(origin + ": no model tensor '" + p.name + "'");
    const std::vector<int64_t> whole = model::global_shape(p.param.sizes(), s.specs[i], g.layout.tp());
    if (t->sizes().vec() != whole) {
      throw CheckpointError(origin + ": model tensor '" + p.name + "' has shape " + c10::str(t->sizes()) +
                            ", the model needs " + c10::str(at::IntArrayRef(whole)));
    }
    if (t->scalar_type() != torch::kFloat) {
      throw CheckpointError(origin + ": model tensor '" + p.name + "' is " + c10::toString(t->scalar_type()) +
                            ", expected float32 (fp32 master weights)");
    }
    shards.push_back(model::shard_of(*t, s.specs[i], g.coords.tp, g.layout.tp()));
  }
  // The optimizer state of the parameters this rank's optimizer updates, cut like their parameters.
  checkpoint::NamedTensors optimizer_tensors;
  for (const auto& [name, tensor] : st.optimizer) {
    const auto slash = name.rfind('/');
    if (slash == std::string::npos) continue;
    const std::string param = name.substr(0, slash);
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (s.params[i].name != param) continue;
      bool bound = false;
      for (const auto& op : s.optimizer_params) bound = bound || op.name == param;
      if (!bound) break;
      const bool placed = tensor.sizes().vec() == model::global_shape(s.params[i].param.sizes(), s.specs[i], g.layout.tp());
      optimizer_tensors.emplace_back(name, placed ? model::shard_of(tensor, s.specs[i], g.coords.tp, g.layout.tp()) : tensor);
      break;
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
      optimizer.object->load_state({st.optimizer_json, optimizer_tensors});
    } else {
      for (const auto& line : optimizer.object->adopt_state(optimizer_tensors))
        notes.push_back("optimizer " + st.optimizer_name + " -> " + optimizer.name() + ": " + line);
    }
  } catch (const std::exception& e) {
    throw CheckpointError("optimizer " + optimizer.name() + " cannot load the checkpoint's " + st.optimizer_name +
                          " state: " + e.what());
  }

  // 3. Weights, data position, RNG, counters.
  for (size_t i = 0; i < s.params.size(); ++i) s.params[i].param.copy_(shards[i]);
  const nlohmann::json fingerprint_now = s.loader->fingerprint();
  s.loader->load_state(ledger, allow_data_change);
  if (allow_data_change && ledger.value("fingerprint", nlohmann::json()) != fingerprint_now) {
    notes.push_back("data changed (allowed by --allow-data-change): checkpoint data " +
                    ledger.value("fingerprint", nlohmann::json()).dump() + ", now " + fingerprint_now.dump());
  }
  s.tokens_seen = st.tokens_seen;
  s.lr_factor = schedule.value("lr_factor", 1.0);
  s.lr_factor_until = schedule.value("lr_factor_until", int64_t{-1});
  checkpoint::restore_rng(st);  // empty when the layout changed: the generators keep their per-rank seeding

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
  std::optional<checkpoint::CheckpointEntry> target;  // chosen by rank 0, the same on every rank
  std::string target_dir;
  if (s.rank0()) {
    for (const auto& e : s.checkpoints->list_valid()) {
      if (e.step <= step) target_dir = e.dir;
    }
  }
  target_dir = s.groups.world->broadcast_string(target_dir, 0);
  if (!target_dir.empty()) target = checkpoint::CheckpointEntry{0, target_dir};
  if (!target) {
    s.event(step, "rollback_unavailable", "no checkpoint to roll back to; the update was skipped instead");
    spdlog::warn("step {}: {} asked for a rollback but this run has no checkpoint yet: update skipped", step, r.decided_by);
    return step + 1;
  }
  if (++s.rollbacks > kMaxRollbacks)
    throw std::runtime_error("more than " + std::to_string(kMaxRollbacks) + " rollbacks in one run: stopping");
  const checkpoint::Manifest manifest = checkpoint::verify_checkpoint_dir(target->dir);
  const checkpoint::TrainingState st = checkpoint::read_full_state(target->dir, manifest, s.groups.rank);
  apply_state(st, target->dir, /*allow_data_change=*/false, /*restore_plugins=*/false);  // plugins keep their memory
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
  s.event(step, "rollback", what);
  s.lineage.notes.push_back("rollback: " + what);
  s.write_lineage();
  spdlog::warn("rollback: {}", what);
  return st.step;
}

void Trainer::apply_control_requests() {
  State& s = *state_;
  // Rank 0 reads the pending requests (control.h) and sends them to every rank, so that all ranks apply the same
  // swaps at the same step boundary; only rank 0 answers the request files and writes events.
  nlohmann::json requests = nlohmann::json::array();
  if (s.rank0()) {
    for (const auto& pending : read_pending_requests(s.paths.control_dir()))
      requests.push_back({{"path", pending.path}, {"text", pending.text}});
  }
  if (!s.groups.world->single()) requests = nlohmann::json::parse(s.groups.world->broadcast_string(requests.dump(), 0));
  for (const auto& item : requests) {
    const std::string path = item.at("path").get<std::string>();
    const int64_t step = s.loader->step();
    std::string outcome;
    try {
      const SwapRequest request = parse_swap_request(item.at("text").get<std::string>());
      if (request.at_step > step) continue;  // not yet: stays pending
      if (request.at_step >= 0 && request.at_step < step)
        throw std::runtime_error("requested for step " + std::to_string(request.at_step) +
                                 ", but the run is already at step " + std::to_string(step));
      const std::string& slot = request.slot;
      plugin_host::parse_slot(slot);
      Config next = s.config;
      for (const auto& override_text : request.overrides()) apply_override(next, override_text, path);
      std::vector<plugin_host::LoadedPlugin> loaded;
      std::string load_error;
      try {
        loaded = plugin_host::PluginHost::load_slot(slot, next);  // may refuse
      } catch (const std::exception& e) {
        load_error = e.what();
      }
      s.agree_or_throw(load_error, "loading " + slot);  // refused on every rank if on any
      save_checkpoint("before swapping " + slot);
      std::string was;
      for (auto* p : s.plugins->all()) {
        if (p->slot == slot) was += (was.empty() ? "" : ",") + p->name();
      }
      std::vector<std::string> lines;
      if (slot == "optimizer") {
        torch::NoGradGuard no_grad;
        loaded.front().object->bind(s.optimizer_params);
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
      s.event(step, "plugin_swap", outcome);
      s.lineage.notes.push_back("plugin swap at " + outcome);
      s.write_lineage();
      spdlog::info("plugin swap: {}", outcome);
      if (s.rank0()) mark_request_done(path);
    } catch (const parallel::DistributedError&) {
      throw;
    } catch (const std::exception& e) {
      outcome = e.what();
      s.event(step, "plugin_swap_refused", outcome);
      spdlog::error("swap request {} refused; the run keeps its plugins: {}", path, outcome);
      if (s.rank0()) mark_request_refused(path, outcome);
    }
  }
}

Trainer::StepRecord Trainer::train_step(int64_t step) {
  State& s = *state_;
  const Config& c = s.config;
  const auto start = std::chrono::steady_clock::now();
  s.step_updated = false;
  StepRecord r;
  sdk::StepContext& ctx = r.ctx;
  ctx.step = step;
  ctx.total_steps = c.train.steps;
  ctx.tokens_before = s.tokens_seen;
  ctx.tensor_names = s.tensor_names;
  ctx.kernels = kernels::host_kernels();  // fused multi-tensor optimizer steps for parameters on a GPU
  {
    const parallel::ProcessGroups& g = s.groups;
    ctx.rank = g.rank;
    ctx.world_size = g.world_size();
    ctx.dp_rank = g.coords.dp;
    ctx.dp_size = g.layout.dp();
    ctx.tp_rank = g.coords.tp;
    ctx.tp_size = g.layout.tp();
    ctx.pp_rank = g.coords.pp;
    ctx.pp_size = g.layout.pp();
  }

  // 0. step start: the data mixture plugin may change the weights from this step on.
  if (plugin_host::LoadedPlugin* mixture = s.plugins->data_mixture()) {
    const std::string weights = s.call(*mixture, ctx, [&](sdk::Plugin& p) {
      return p.mixture_at(step, s.loader->source_names());
    });
    check_mixture(weights, mixture->name(), step, s.loader->source_names());
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
  if (plugin_host::LoadedPlugin* schedule = s.plugins->lr_schedule()) {
    ctx.lr = s.call(*schedule, ctx, [&](sdk::Plugin& p) { return p.learning_rate(ctx, ctx.base_lr); });
    check_learning_rate(ctx.lr, schedule->name(), step);
  }
  if (step < s.lr_factor_until) ctx.lr *= s.lr_factor;

  // 1. batch: the data plan of this step is a pure function of (seed, data config, ledger, step); every rank
  // plans the whole global batch and DP rank d reads its contiguous slice of it.
  const parallel::ProcessGroups& g = s.groups;
  data::BatchPlan plan = s.loader->plan_next();
  TORCH_CHECK(plan.step == step, "data plan is at step ", plan.step, " but the trainer is at step ", step);
  for (const auto& sample : plan.samples)
    ctx.batch.push_back({s.loader->source_names().at(sample.source), sample.sample_id, sample.epoch, sample.chunk});
  const int64_t rank_batch = c.global_batch() / g.layout.dp();
  const int64_t micro_batch = c.rank_micro_batch();
  const int64_t microbatches = c.microbatches_per_rank();
  torch::Tensor window = s.loader->tokens(plan, g.coords.dp * rank_batch, rank_batch);  // [B/dp, T+1]
  // On a GPU the copy goes from pinned memory without blocking the host (the stream keeps it ordered).
  window = s.device.is_cuda() ? window.pin_memory().to(s.device, /*non_blocking=*/true) : window.to(s.device);
  const int64_t T = window.size(1) - 1;
  ctx.tokens = c.global_batch() * T;

  // 2. loss: forward + backward of the micro-batches through the pipeline stages (one stage when pp = 1);
  // fp32 gradients accumulate in this rank's master weights. The loss lives on the last stage.
  for (auto& p : s.params) p.param.mutable_grad() = torch::Tensor();
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(s.device));
  torch::Tensor z_loss_sum = torch::zeros_like(loss_sum);
  parallel::PipelineStage stage;
  stage.activation_shape = {micro_batch, T, c.model.d_model};
  stage.activation_dtype = s.compute_dtype;
  stage.device = s.device;
  stage.forward = [&](int64_t micro, const torch::Tensor& input) -> torch::Tensor {
    torch::Tensor micro_window = window.narrow(0, micro * micro_batch, micro_batch);  // [b, T+1]
    torch::Tensor x = g.first_stage() ? s.model->embed(micro_window.narrow(1, 0, T), s.compute_dtype)  // [b, T, C]
                                      : input;
    x = s.model->run_blocks(x);  // [b, T, C]
    if (!g.last_stage()) return x;
    model::CrossEntropyParts parts = s.model->head_loss(x, micro_window.narrow(1, 1, T));
    loss_sum += parts.nll.detach();
    z_loss_sum += parts.z_loss.detach();
    return parts.loss / static_cast<double>(microbatches);  // the mean over micro-batches; DP averages below
  };
  // DP overlap: during the last micro-batch's backward each gradient bucket starts its all-reduce as soon as
  // it is complete. The per-rank check below still sees this rank's own gradients: the reduced values only
  // replace .grad in all_reduce_mean().
  stage.before_backward = [&](int64_t micro) {
    if (s.reducer && micro == microbatches - 1) s.reducer->prepare_overlap();
  };
  parallel::run_pipeline(stage, microbatches, *g.pp, parallel::parse_pipeline_schedule(c.parallel.schedule));
  // [loss, z_loss]: from the last stage to every stage, then the mean over DP replicas.
  torch::Tensor losses = torch::stack({loss_sum, z_loss_sum}) / static_cast<double>(microbatches);  // [2]
  const torch::Tensor own_losses = losses.clone();  // this rank's (zeros before the last stage)
  if (!g.pp->single()) g.pp->broadcast(losses, g.layout.pp() - 1);

  // 3. grads. First a per-rank check, before any reduction mixes ranks: name every rank whose loss or
  // gradient is not finite. Then the DP mean, the TP sum of partial gradients, and norms of the whole model.
  if (s.fault.at("nan_grad", g.rank, step) && !s.params.empty()) {
    torch::NoGradGuard no_grad;
    s.params.front().param.mutable_grad().fill_(std::numeric_limits<float>::quiet_NaN());
  }
  // Everything the host needs from this step travels in ONE device-to-host copy below: the per-rank
  // non-finite flags, the losses, and the whole model's per-tensor gradient and weight squares. Until then the
  // step only enqueues work (no host synchronisation inside the step on a GPU).
  const auto fp32_here = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  torch::Tensor flags = torch::zeros({g.world_size()}, fp32_here);  // [world]: 1 where a rank saw a non-finite value
  {
    std::vector<torch::Tensor> sums{own_losses.sum()};  // NaN/inf propagate through sums
    for (const auto& p : s.params) {
      if (p.param.grad().defined()) sums.push_back(p.param.grad().detach().sum().to(torch::kFloat));
    }
    flags.narrow(0, g.rank, 1).copy_(torch::isfinite(torch::stack(sums).sum()).logical_not().to(torch::kFloat).view({1}));
  }
  // Always completed, even on a skipped step: buckets may already be in flight, and every rank must run the
  // same collectives.
  if (s.reducer) s.reducer->all_reduce_mean();
  if (!g.tp->single()) {
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (s.specs[i].grad_partial_over_tp && s.params[i].param.grad().defined()) g.tp->all_reduce(s.params[i].param.mutable_grad());
    }
  }
  if (!g.dp->single()) {
    g.dp->all_reduce(losses);
    losses /= static_cast<double>(g.layout.dp());
  }
  std::vector<torch::Tensor> grads, weights;
  for (const auto& p : s.params) {
    grads.push_back(p.param.grad());
    weights.push_back(p.param);
  }
  const int64_t n = static_cast<int64_t>(s.tensor_names.size());
  // [world + n + n]: flags, gradient squares, weight squares (the weights this step's forward used; skipped
  // unless metrics.per_tensor), summed over every rank in one collective.
  torch::Tensor summed = torch::cat({flags, s.placed_squares(grads),
                                     c.metrics.per_tensor ? s.placed_squares(weights) : torch::zeros({n}, fp32_here)});
  if (!g.world->single()) g.world->all_reduce(summed);
  const torch::Tensor host = torch::cat({summed, losses.to(torch::kFloat)}).to(torch::kCPU, torch::kDouble);  // the one read
  const double* h = host.data_ptr<double>();
  std::string non_finite_ranks;
  for (int64_t r = 0; r < g.world_size(); ++r) {
    if (h[r] > 0.0) non_finite_ranks += (non_finite_ranks.empty() ? "" : ", ") + g.layout.describe_rank(r);
  }
  const double* grad_squares = h + g.world_size();
  const double* weight_squares = grad_squares + n;
  double grad_square_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) grad_square_sum += grad_squares[i];
  ctx.loss = weight_squares[n];
  ctx.z_loss = weight_squares[n + 1];
  ctx.grad_norm = std::sqrt(grad_square_sum);
  if (c.metrics.per_tensor) {
    for (int64_t i = 0; i < n; ++i) {
      ctx.tensor_grad_norms.push_back(static_cast<float>(std::sqrt(grad_squares[i])));
      r.tensor_param_norms.push_back(static_cast<float>(std::sqrt(weight_squares[i])));
    }
  }
  ctx.clip_factor = optim::clip_grads_by_global_norm(s.params, ctx.grad_norm, c.optim.grad_clip);

  torch::NoGradGuard no_grad;  // every hook below changes tensors in place
  // 4. grad transforms, in chain order (each rank transforms its own shards).
  for (auto& transform : s.plugins->grad_transforms())
    s.call(transform, ctx, [&](sdk::Plugin& p) { p.transform_grads(ctx, s.plugin_params); });

  // 5. step decision: a non-finite loss or gradient never reaches the weights; then the spike handler. Every
  // rank runs the handler (its state stays identical everywhere), rank 0's decision is the one all apply.
  if (!non_finite_ranks.empty() || !std::isfinite(ctx.loss) || !std::isfinite(ctx.grad_norm)) {
    r.decision = sdk::Decision::skip_update(
        non_finite_ranks.empty()
            ? "non-finite loss " + std::to_string(ctx.loss) + " or grad norm " + std::to_string(ctx.grad_norm)
            : "non-finite loss or gradient on " + non_finite_ranks + " at step " + std::to_string(step));
    r.decided_by = "keel";
  } else if (plugin_host::LoadedPlugin* handler = s.plugins->spike_handler()) {
    r.decision = s.call(*handler, ctx, [&](sdk::Plugin& p) { return p.decide(ctx); });
    r.decided_by = handler->name();
    check_decision(r.decision, handler->name(), step, s.loader->source_names());
  }
  // Non-finite weights (an earlier update poisoned them: an optimizer or grad transform plugin) make every
  // later step non-finite: stop instead of skipping forever. Checked only on this rare path.
  if (r.decided_by == "keel") s.stop_if_weights_not_finite(step);
  if (!g.world->single()) r.decision = decision_from_json(g.world->broadcast_string(decision_to_json(r.decision, r.decided_by), 0), r.decided_by);
  if (r.decision.action != sdk::Decision::Action::kRollback && r.decision.lr_factor != 1.0 && r.decision.lr_factor_steps > 0) {
    s.lr_factor = r.decision.lr_factor;
    s.lr_factor_until = step + r.decision.lr_factor_steps;
    ctx.lr = ctx.lr * r.decision.lr_factor;
    s.event(step, "lr_factor", "[" + r.decided_by + "] LR x" + std::to_string(r.decision.lr_factor) + " until step " +
                                   std::to_string(s.lr_factor_until) + ": " + r.decision.reason);
  }
  if (r.decision.action != sdk::Decision::Action::kContinue &&
      r.decision.action != sdk::Decision::Action::kRollback) {  // a rollback logs its own event in roll_back()
    static const char* const kinds[] = {"continue", "skip", "rollback", "stop"};
    const char* kind = kinds[static_cast<int>(r.decision.action)];
    s.event(step, kind, "[" + r.decided_by + "] " + r.decision.reason);
    spdlog::warn("step {}: {} by {}: {}", step, kind, r.decided_by, r.decision.reason);
  }

  // 6. optimizer step (with ZeRO-1 each DP rank updates its share, then owners broadcast the new weights).
  if (r.updated()) {
    s.call(s.plugins->optimizer(), ctx, [&](sdk::Plugin& p) { p.step(ctx); });
    if (s.zero_enabled()) {
      std::vector<at::Tensor> tensors;
      for (const auto& p : s.params) tensors.push_back(p.param);
      optim::broadcast_from_owners(tensors, s.zero, *g.dp);
    }
  }

  // 7. step end: metrics row, then every plugin's on_step_end (observers). From here on the step counts: a
  // failure stops the run after a checkpoint of this step's state.
  s.tokens_seen += ctx.tokens;
  s.step_updated = true;
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
  row.tensor_param_norms = r.tensor_param_norms;
  if (s.metrics) s.metrics->append(row);
  for (plugin_host::LoadedPlugin* p : s.plugins->all())
    s.call(*p, ctx, [&](sdk::Plugin& plugin) { plugin.on_step_end(ctx); });
  return r;
}

}  // namespace keel::train

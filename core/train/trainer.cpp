// Why: see trainer.h. Read top to bottom: setup, then the loop, then one step as a sequence of named stages
// (step_stages.h), in the order the plugins' hooks run: data mixture and LR (step start) -> batch -> loss ->
// grads (the one-packet reduction, clipping) -> grad transforms -> step decision (spike handler) -> optimizer
// step -> step end (metrics, observers). Checkpoints (checkpointer.h), rollbacks and plugin swaps
// (plugin_swap.h) happen between steps.
#include "core/train/trainer.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <thread>

#include "core/checkpoint/training_state.h"
#include "core/metrics/progress.h"
#include "core/model/parametrization.h"
#include "core/train/checkpointer.h"
#include "core/train/plugin_continuity.h"
#include "core/train/plugin_swap.h"
#include "core/train/skip_rules.h"
#include "core/train/step_reduction.h"
#include "core/train/step_stages.h"
#include "core/train/step_stats.h"
#include "core/train/trainer_state.h"
#include "kernels/dispatch.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;

std::atomic<bool> g_stop_requested{false};
std::atomic<pid_t> g_parent_pid{0};  // the parent when the handlers were installed (a launcher, a shell)

// First signal: stop at the next step boundary (after saving a checkpoint). Second: the user insists; leave now
// (a checkpoint being written stays a .tmp directory and is never loaded). A signal that comes after the
// parent died is the launcher's death signal (PR_SET_PDEATHSIG) following a SIGTERM it forwarded, as when a
// supervisor sends SIGTERM then SIGKILL: not an insistence, so the stop checkpoint is still saved.
extern "C" void on_stop_signal(int signal) {
  if (g_stop_requested.exchange(true) && ::getppid() == g_parent_pid.load()) {
    static const char message[] = "\nkeel: second stop signal: exiting now without a checkpoint\n";
    (void)!::write(2, message, sizeof(message) - 1);
    ::_exit(128 + signal);
  }
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
  g_parent_pid = ::getppid();
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

bool stop_requested() { return g_stop_requested.load(); }

Trainer::Trainer(Config config, RunPaths paths, std::unique_ptr<data::DataLoader> loader, checkpoint::Lineage lineage,
                 parallel::ProcessGroups groups, TestFault fault)
    : state_(std::make_unique<TrainerState>()), reduction_(std::make_unique<StepReduction>()) {
  TrainerState& s = *state_;
  s.config = std::move(config);
  s.paths = std::move(paths);
  s.lineage = std::move(lineage);
  s.groups = std::move(groups);
  s.fault = std::move(fault);
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
  if (c.train.device == Device::kCuda) {
    TORCH_CHECK(torch::cuda::is_available(), "train.device = cuda but no CUDA device is available to this build");
    s.device = torch::Device(torch::kCUDA,
                             static_cast<c10::DeviceIndex>(g.world_info.local_rank % torch::cuda::device_count()));
    kernels::set_current_cuda_device(s.device.index());  // else every rank also opens a context on GPU 0
  }
  s.compute_dtype = c.train.precision == Precision::kBf16Mixed ? torch::kBFloat16 : torch::kFloat;

  s.loader = std::move(loader);
  TORCH_CHECK(s.loader && s.loader->global_batch() == c.global_batch(),
              "trainer needs a data loader for the global batch");

  // LibTorch seeds its default generators nondeterministically; seed them so that anything random in a step
  // (now or in a plugin) is reproducible: rank r uses train.seed + r. Their state is saved in checkpoints.
  torch::manual_seed(c.train.seed + static_cast<uint64_t>(g.rank));
  parallel::TensorParallel tp{g.coords.tp, g.layout.tp(), g.layout.tp() > 1 ? g.tp : nullptr};
  tp.sequence_parallel = c.parallel.sp;  // parallel.sp: the model splits its residual stream over the sequence
  const parallel::Layout::StageLayers layers = g.layout.stage_layers(c.model.layers, g.coords.pp);
  s.model = model::Llama(c.model, tp, model::StageSpec{layers.first, layers.count, g.first_stage(), g.last_stage()});
  s.model->init_weights(c.train.seed);  // the same full weights in every layout
  s.model->to(s.device);
  const auto specs = model::shard_specs(*s.model);
  std::string local_names;
  for (const auto& item : s.model->named_parameters()) {
    const bool decay = item.value().dim() >= 2;  // matrices decay; norm weights and biases do not
    s.params.push_back({item.key(), item.value(), decay});
    const double lr_scale = model::mup_lr_scale(c.model, item.key(), item.value().dim());  // 1 unless μP
    s.plugin_params.push_back({item.key(), item.value(), decay, lr_scale});
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
    s.metrics = std::make_unique<metrics::MetricsWriter>(
        s.paths.metrics_h5(), metrics::OpenMode::kCreate, flatten(c),
        c.metrics.per_tensor ? s.tensor_names : std::vector<std::string>{}, c.metrics.flush_every);
  }
  spdlog::info("model: {} layers, d_model {}, {} heads ({} kv), vocab {}, seq_len {}: {:.2f}M parameters on this rank",
               c.model.layers, c.model.d_model, c.model.heads, c.model.kv_heads, c.model.vocab, c.model.seq_len,
               s.model->num_parameters() / 1e6);
  spdlog::info(
      "batch: {} sequences = {} tokens per step; {} ({} micro-batches of {} per DP rank{}); precision {}; device {}",
      c.global_batch(), c.tokens_per_step(), g.layout.describe(), c.microbatches_per_rank(), c.rank_micro_batch(),
      g.layout.pp() > 1 ? ", " + name_of(c.parallel.schedule) + " pipeline" : "", name_of(c.train.precision),
      name_of(c.train.device));
}

Trainer::~Trainer() = default;

TrainSummary Trainer::train() {
  TrainerState& s = *state_;
  TrainSummary summary;
  summary.metrics_path = s.paths.metrics_h5();
  record_loaded_plugins(s, s.loader->step());  // the libraries (path, SHA-256) this run starts with
  s.write_lineage();
  s.event(s.loader->step(), "run_start",
          "steps " + std::to_string(s.config.train.steps) + ", " + s.lineage.kind() + " run " + s.lineage.run_id);
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
      finish_background_save(s, /*wait=*/false);  // commits a checkpoint.async save once every rank's file is durable
      const sdk::StepContext& ctx = r.ctx;
      if (summary.steps_run == 0) summary.first_loss = ctx.loss;
      ++summary.steps_run;
      summary.last_step = step;
      summary.last_loss = ctx.loss;
      meter.update(r.step_time_s, static_cast<double>(ctx.tokens));
      const bool log_line = (step + 1) % c.train.log_every == 0 || step + 1 == c.train.steps || !r.updated();
      if (log_line && s.rank0())
        spdlog::info(
            metrics::format_progress({step, c.train.steps, ctx.loss, ctx.grad_norm, ctx.lr, meter.tokens_per_s(),
                                      meter.eta_s(c.train.steps - step - 1), !r.updated()}));
      // Step boundary: decisions that leave the straight path, then signals, checkpoints and swap requests.
      if (r.decision.action == sdk::Decision::Action::kRollback) {
        const int64_t next = roll_back(s, step, r);
        if (next <= step) {  // rolled back: the loop's ++step continues at the checkpoint's step
          step = next - 1;
          continue;
        }  // no checkpoint to roll back to: the update was skipped, and checkpoints and requests go on as usual
      }
      if (r.decision.action == sdk::Decision::Action::kStop) {
        summary.stopped_by_plugin = true;
        spdlog::warn("step {}: {} stopped the run: {}", step, r.decided_by, r.decision.reason);
        train::save_checkpoint(s, "stopped by " + r.decided_by);
        break;
      }
      if (status == BoundaryStatus::kStop) {  // every rank stops after the same step
        summary.stopped_by_signal = true;
        // Steps are numbered from 0; checkpoint step-N holds the state after N steps (a resume starts at step N).
        const std::string name = checkpoint::step_dir_name(step + 1);
        s.event(step, "stop",
                "stop signal received during step " + std::to_string(step) + ": saving " + name + " and stopping");
        spdlog::warn(
            "stop signal received during step {}: saving checkpoint {} (a resume starts at step {}) and stopping", step,
            name, step + 1);
        train::save_checkpoint(s, "stop signal");
        break;
      }
      const bool last = step + 1 == c.train.steps;
      const bool due = c.checkpoint.every > 0 && (step + 1) % c.checkpoint.every == 0;
      if (due || (last && c.checkpoint.at_end))
        train::save_checkpoint(s, last ? "end of run" : "every " + std::to_string(c.checkpoint.every),
                               last ? SaveMode::kWait : SaveMode::kBackground);
      if (!last) apply_control_requests(s);
    }
    finish_background_save(s, /*wait=*/true);  // the run ends with no save in flight
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
  TrainerState& s = *state_;
  // Which rank failed, and why (the first failing rank's message is the one every rank reports).
  const std::vector<std::string> failures = s.groups.world->all_gather_strings(failure);
  std::string message;
  for (size_t r = 0; r < failures.size() && message.empty(); ++r) {
    if (failures[r].empty()) continue;
    message =
        (s.groups.world->single() ? "" : s.groups.layout.describe_rank(static_cast<int64_t>(r)) + ": ") + failures[r];
  }
  message = "step " + std::to_string(step) + ": " + message;
  spdlog::error("{}; saving a checkpoint of the state after step {} before stopping", message, step);
  // The update of `step` is applied everywhere, so the state after it is a consistent checkpoint.
  try {
    message += "; saved " + train::save_checkpoint(s, "stopped by a failure after step " + std::to_string(step));
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

std::string Trainer::save_checkpoint(const std::string& reason) { return train::save_checkpoint(*state_, reason); }

void Trainer::restore(const checkpoint::TrainingState& st, bool allow_data_change) {
  TrainerState& s = *state_;
  const std::vector<std::string> notes =
      apply_checkpoint(s, st, s.lineage.parent_checkpoint, allow_data_change, /*restore_plugins=*/true);
  for (const auto& note : notes) s.lineage.notes.push_back(note);
  for (const auto& kept : carry_parent_skip_rules(s)) s.lineage.notes.push_back("data: " + kept);
  for (const auto& change : s.loader->adopt_config(s.config)) s.lineage.notes.push_back("data: " + change);
  record_skip_list(s);  // `keel resume --skip-list`: skip_rules.json names the rules from the start
  s.event(st.step, "resume", "from " + s.lineage.parent_checkpoint + " (" + s.lineage.kind() + ")");
  for (const auto& note : s.lineage.notes) s.event(st.step, "lineage", note);
  spdlog::info("resumed at step {} ({} tokens seen) from {}", st.step, st.tokens_seen, s.lineage.parent_checkpoint);
}

StepRecord Trainer::train_step(int64_t step) {
  TrainerState& s = *state_;
  const auto start = std::chrono::steady_clock::now();
  s.step_updated = false;
  StepRecord r;
  r.ctx = begin_context(s, step);
  run_step_start_hooks(s, r.ctx);                     // 0. step start: mixture, LR
  const torch::Tensor window = load_batch(s, r.ctx);  // 1. batch          [B/dp, T+1]
  torch::Tensor own_losses;                           //    [2] this rank's [loss, z_loss]
  torch::Tensor sample_losses;                        //    [B/dp] per-sample mean loss
  const bool stats_step = stats_due(s.config, step);  // metrics.stats_every: instability precursors
  model::ForwardStats forward_stats = stats_step ? begin_forward_stats(s) : model::ForwardStats{};
  torch::Tensor losses = forward_backward(s, window, own_losses, sample_losses,
                                          stats_step ? &forward_stats : nullptr);  // 2. loss  [2]
  const std::string non_finite_ranks =
      reduce_and_clip(s, *reduction_, r, own_losses, losses, sample_losses);  // 3. grads
  transform_grads(s, r.ctx);                                                  // 4. grad transforms
  decide(s, r, non_finite_ranks);                                             // 5. step decision
  const std::vector<torch::Tensor> weights_before = stats_step ? snapshot_weights(s) : std::vector<torch::Tensor>{};
  apply_update(s, r);                                                  // 6. optimizer step
  if (stats_step) collect_stats(s, r, forward_stats, weights_before);  //    stats: /stats/, on_stats
  end_step(s, r, start);                                               // 7. step end: metrics, observers
  return r;
}

}  // namespace keel::train

// Why: see trainer.h. Read top to bottom: setup, then the loop, then one step stage by stage.
#include "core/train/trainer.h"

#include <atomic>
#include <chrono>
#include <csignal>
#include <cmath>
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
#include "core/metrics/hdf5_handle.h"
#include "core/metrics/metrics_writer.h"
#include "core/metrics/progress.h"
#include "core/model/llama.h"
#include "core/optim/adamw.h"

namespace keel::train {
namespace {

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

}  // namespace

void install_stop_signal_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

bool stop_requested() { return g_stop_requested.load(); }

struct Trainer::State {
  Config config;
  RunPaths paths;
  torch::Device device{torch::kCPU};
  torch::ScalarType compute_dtype = torch::kFloat;
  model::Llama model{nullptr};
  std::vector<optim::NamedParameter> params;
  std::unique_ptr<optim::AdamW> optimizer;
  std::unique_ptr<data::DataLoader> loader;
  std::unique_ptr<metrics::MetricsWriter> metrics;
  int64_t tokens_seen = 0;
  checkpoint::Lineage lineage;
  std::unique_ptr<checkpoint::CheckpointStore> checkpoints;
  std::string last_checkpoint;

  int64_t decay_steps() const { return config.optim.decay_steps > 0 ? config.optim.decay_steps : config.train.steps; }
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
  }
  s.optimizer = std::make_unique<optim::AdamW>(
      s.params, optim::AdamWOptions{c.optim.beta1, c.optim.beta2, c.optim.eps, c.optim.weight_decay});

  std::vector<std::string> tensor_names;
  for (const auto& p : s.params) tensor_names.push_back(p.name);
  s.metrics = std::make_unique<metrics::MetricsWriter>(s.paths.metrics_h5(), metrics::OpenMode::kCreate, flatten(c),
                                                       c.metrics.per_tensor ? tensor_names : std::vector<std::string>{},
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
  const Config& c = s.config;
  TrainSummary summary;
  summary.metrics_path = s.paths.metrics_h5();
  checkpoint::write_file_atomically(s.paths.lineage_json(), checkpoint::lineage_to_json(s.lineage));
  s.metrics->event(s.loader->step(), "run_start", "steps " + std::to_string(c.train.steps) + ", " + s.lineage.kind() +
                                                      " run " + s.lineage.run_id);
  if (s.loader->step() >= c.train.steps) {
    spdlog::warn("nothing to do: the run is already at step {} and train.steps = {} (set train.steps higher)",
                 s.loader->step(), c.train.steps);
  }
  metrics::ThroughputMeter meter;

  for (int64_t step = s.loader->step(); step < c.train.steps; ++step) {
    StepContext ctx = train_step(step);
    if (summary.steps_run == 0) summary.first_loss = ctx.loss;
    ++summary.steps_run;
    summary.last_step = step;
    summary.last_loss = ctx.loss;
    meter.update(ctx.step_time_s, static_cast<double>(ctx.tokens));
    if ((step + 1) % c.train.log_every == 0 || step + 1 == c.train.steps)
      spdlog::info(metrics::format_progress({step + 1, c.train.steps, ctx.loss, ctx.grad_norm, ctx.lr,
                                             meter.tokens_per_s(), meter.eta_s(c.train.steps - step - 1),
                                             ctx.decision != StepDecision::kContinue}));
    // Step boundary: a stop signal saves and leaves; otherwise a checkpoint when one is due.
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
  st.optimizer_name = "adamw";
  st.optimizer_step = s.optimizer->step_count();
  st.optimizer = s.optimizer->state_tensors();
  st.lr_schedule = nlohmann::json{{"kind", "warmup_cosine"},
                                  {"lr", c.optim.lr},
                                  {"min_lr", c.optim.min_lr},
                                  {"warmup_steps", c.optim.warmup_steps},
                                  {"decay_steps", s.decay_steps()},
                                  {"next_step", step}}
                       .dump();
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
  using checkpoint::CheckpointError;
  State& s = *state_;
  // 1. Check everything before touching anything.
  auto find = [](const checkpoint::NamedTensors& list, const std::string& name) -> const torch::Tensor* {
    for (const auto& [n, t] : list) {
      if (n == name) return &t;
    }
    return nullptr;
  };
  auto check_tensor = [&](const checkpoint::NamedTensors& list, const std::string& name, const torch::Tensor& like) {
    const torch::Tensor* t = find(list, name);
    if (!t) throw CheckpointError("checkpoint has no tensor '" + name + "'");
    if (t->sizes() != like.sizes()) {
      throw CheckpointError("checkpoint tensor '" + name + "' has shape " + c10::str(t->sizes()) + ", the model needs " +
                            c10::str(like.sizes()));
    }
    if (t->scalar_type() != torch::kFloat) {
      throw CheckpointError("checkpoint tensor '" + name + "' is " + c10::toString(t->scalar_type()) +
                            ", expected float32 (fp32 master weights and optimizer state)");
    }
  };
  if (st.model.size() != s.params.size()) {
    throw CheckpointError("checkpoint has " + std::to_string(st.model.size()) + " model tensors, the model has " +
                          std::to_string(s.params.size()));
  }
  for (const auto& p : s.params) check_tensor(st.model, p.name, p.param);
  if (st.optimizer_name != "adamw") throw CheckpointError("checkpoint optimizer '" + st.optimizer_name + "' is not adamw");
  for (const auto& p : s.params) {
    check_tensor(st.optimizer, p.name + "/exp_avg", p.param);
    check_tensor(st.optimizer, p.name + "/exp_avg_sq", p.param);
  }
  const nlohmann::json ledger = nlohmann::json::parse(st.data_ledger, nullptr, /*allow_exceptions=*/false);
  if (ledger.is_discarded() || !ledger.is_object() || ledger.value("step", int64_t{-1}) != st.step) {
    throw CheckpointError("checkpoint data ledger is malformed or not at step " + std::to_string(st.step));
  }
  const nlohmann::json fingerprint_before = s.loader->fingerprint();
  s.loader->load_state(ledger, allow_data_change);  // validates fully before changing the loader

  // 2. Apply.
  {
    torch::NoGradGuard no_grad;
    for (auto& p : s.params) p.param.copy_(*find(st.model, p.name));
  }
  s.optimizer->load_state_tensors(st.optimizer, st.optimizer_step);
  s.tokens_seen = st.tokens_seen;
  checkpoint::restore_rng(st);
  if (allow_data_change && ledger.value("fingerprint", nlohmann::json()) != fingerprint_before) {
    s.lineage.notes.push_back("data changed (allowed by --allow-data-change): checkpoint data " +
                              ledger.value("fingerprint", nlohmann::json()).dump() + ", now " + fingerprint_before.dump());
  }
  for (const auto& change : s.loader->adopt_config(s.config)) s.lineage.notes.push_back("data: " + change);
  s.metrics->event(st.step, "resume", "from " + s.lineage.parent_checkpoint + " (" + s.lineage.kind() + ")");
  for (const auto& note : s.lineage.notes) s.metrics->event(st.step, "lineage", note);
  spdlog::info("resumed at step {} ({} tokens seen) from {}", st.step, st.tokens_seen, s.lineage.parent_checkpoint);
}

StepContext Trainer::train_step(int64_t step) {
  State& s = *state_;
  const Config& c = s.config;
  const auto start = std::chrono::steady_clock::now();
  StepContext ctx;
  ctx.step = step;
  ctx.tokens_before = s.tokens_seen;
  ctx.lr = optim::warmup_cosine_lr(step, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, s.decay_steps());

  // 1. batch: the data plan of this step is a pure function of (seed, data config, step).
  data::BatchPlan plan = s.loader->plan_next();
  TORCH_CHECK(plan.step == step, "data plan is at step ", plan.step, " but the trainer is at step ", step);
  for (const auto& sample : plan.samples) ctx.sources.push_back(s.loader->source_names().at(sample.source));
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

  // 3. grads: per-tensor norms and the global norm, fetched to the host once per step.
  torch::Tensor tensor_grad_norms = optim::per_tensor_grad_norms(s.params);  // [n]
  torch::Tensor scalars = torch::stack({loss_sum / static_cast<double>(c.train.grad_accum),
                                        z_loss_sum / static_cast<double>(c.train.grad_accum),
                                        optim::global_norm(tensor_grad_norms).to(torch::kFloat)})
                              .to(torch::kCPU, torch::kDouble);
  ctx.loss = scalars[0].item<double>();
  ctx.z_loss = scalars[1].item<double>();
  ctx.grad_norm = scalars[2].item<double>();
  if (c.metrics.per_tensor) ctx.tensor_grad_norms = to_float_vector(tensor_grad_norms);

  // 4. grad transforms: global-norm clipping.
  ctx.clip_factor = optim::clip_grads_by_global_norm(s.params, ctx.grad_norm, c.optim.grad_clip);

  // 5. step decision: a non-finite loss or gradient never reaches the weights.
  if (!std::isfinite(ctx.loss) || !std::isfinite(ctx.grad_norm)) {
    ctx.decision = StepDecision::kSkipUpdate;
    ctx.decision_reason = "non-finite loss " + std::to_string(ctx.loss) + " or grad norm " + std::to_string(ctx.grad_norm);
    s.metrics->event(step, "skip", ctx.decision_reason);
    spdlog::warn("step {}: skipped update: {}", step, ctx.decision_reason);
  }

  // 6. optimizer step.
  if (ctx.decision == StepDecision::kContinue) s.optimizer->step(ctx.lr);

  // 7. step end: metrics row.
  if (c.metrics.per_tensor) ctx.tensor_param_norms = to_float_vector(optim::per_tensor_param_norms(s.params));
  s.tokens_seen += ctx.tokens;
  ctx.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  metrics::StepRow row;
  row.step = step;
  row.loss = ctx.loss;
  row.grad_norm = ctx.grad_norm;
  row.lr = ctx.lr;
  row.tokens = s.tokens_seen;
  row.tokens_per_s = ctx.tokens / std::max(ctx.step_time_s, 1e-9);
  row.step_time_s = ctx.step_time_s;
  row.skipped = ctx.decision != StepDecision::kContinue;
  row.tensor_grad_norms = ctx.tensor_grad_norms;
  row.tensor_param_norms = ctx.tensor_param_norms;
  s.metrics->append(row);
  return ctx;
}

}  // namespace keel::train

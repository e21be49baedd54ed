// Why: see step_stages.h.
#include "core/train/step_stages.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/data/mixture.h"
#include "core/forensics/replay_check.h"
#include "core/metrics/run_log.h"
#include "core/parallel/pipeline.h"
#include "core/plugin_host/host_kernels.h"
#include "core/train/batch_record.h"
#include "core/train/moment_scales.h"
#include "core/train/plugin_values.h"
#include "kernels/dispatch.h"

namespace keel::train {
namespace {

// A decision crosses ranks as JSON (rank 0's is the one every rank applies).
std::string decision_to_json(const sdk::Decision& d, const std::string& decided_by) {
  return nlohmann::json{
      {"action", static_cast<int>(d.action)},       {"reason", d.reason},       {"skip_data", d.skip_data},
      {"reset_moments", d.reset_optimizer_moments}, {"lr_factor", d.lr_factor}, {"lr_factor_steps", d.lr_factor_steps},
      {"moment_scales", d.moment_scales},           {"by", decided_by}}
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
  d.moment_scales = j.at("moment_scales").get<std::string>();
  decided_by = j.at("by").get<std::string>();
  return d;
}

// resume.verify_steps = K: the resume's first K steps must reproduce the parent's logged rows bit for bit where the
// parent logged them (rank 0, which has the whole step's row). A difference stops the run naming step and value.
void check_against_parent(TrainerState& s, const metrics::StepRow& row, const StepRecord& r) {
  if (s.lineage.is_root()) return;
  if (!s.replay_check) {
    // The parent's rows: the run dir the checkpoint lies in (RUN/checkpoints/step-N), else the one its lineage names.
    std::string parent = RunPaths{s.lineage.parent_run_dir}.metrics_h5();
    const std::filesystem::path holder =
        std::filesystem::path(s.lineage.parent_checkpoint).lexically_normal().parent_path().parent_path();
    std::error_code ec;
    if (!s.lineage.parent_checkpoint.empty() && std::filesystem::exists(holder / "metrics.h5", ec))
      parent = RunPaths{holder.string()}.metrics_h5();
    s.replay_check = std::make_shared<forensics::ReplayCheck>(parent, row.step, s.config.resume.verify_steps);
    const int64_t last = row.step + s.replay_check->overlap() - 1;
    spdlog::info("resume.verify_steps = {}: the parent logged {} of these steps; comparing them with {}",
                 s.config.resume.verify_steps, s.replay_check->overlap(), parent);
    if (s.replay_check->overlap() == 0)
      s.event(row.step, "verify", "resume.verify_steps: the parent logged none of the first steps; nothing compared");
    else
      s.event(row.step, "verify",
              "resume.verify_steps: comparing steps " + std::to_string(row.step) + ".." + std::to_string(last) +
                  " with " + parent);
  }
  if (!s.replay_check->covers(row.step)) return;
  s.replay_check->check({row.step, row.loss, row.grad_norm, row.tensor_grad_norms, row.tensor_param_norms,
                         r.sample_losses});  // throws on a difference
  if (row.step == s.replay_check->first_step() + s.replay_check->overlap() - 1) {
    const std::string text = "resume.verify_steps: steps " + std::to_string(s.replay_check->first_step()) + ".." +
                             std::to_string(row.step) + " are bit-identical to the parent's logged rows";
    s.event(row.step, "verify", text);
    spdlog::info("{}", text);
  }
}

}  // namespace

sdk::StepContext begin_context(const TrainerState& s, int64_t step) {
  sdk::StepContext ctx;
  ctx.step = step;
  ctx.total_steps = s.config.train.steps;
  ctx.tokens_before = s.tokens_seen;
  ctx.tensor_names = s.tensor_names;
  ctx.kernels = plugin_host::host_kernels();  // fused multi-tensor optimizer steps for parameters on a GPU
  const parallel::ProcessGroups& g = s.groups;
  ctx.rank = g.rank;
  ctx.world_size = g.world_size();
  ctx.dp_rank = g.coords.dp;
  ctx.dp_size = g.layout.dp();
  ctx.tp_rank = g.coords.tp;
  ctx.tp_size = g.layout.tp();
  ctx.pp_rank = g.coords.pp;
  ctx.pp_size = g.layout.pp();
  return ctx;
}

void run_step_start_hooks(TrainerState& s, sdk::StepContext& ctx) {
  const Config& c = s.config;
  const int64_t step = ctx.step;
  if (plugin_host::LoadedPlugin* mixture = s.plugins->data_mixture()) {
    const std::string weights =
        s.call(*mixture, ctx, [&](sdk::Plugin& p) { return p.mixture_at(step, s.loader->source_names()); });
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
}

torch::Tensor load_batch(TrainerState& s, sdk::StepContext& ctx) {
  const int64_t step = ctx.step;
  const parallel::ProcessGroups& g = s.groups;
  data::BatchPlan plan = s.loader->plan_next();
  TORCH_CHECK(plan.step == step, "data plan is at step ", plan.step, " but the trainer is at step ", step);
  for (const auto& sample : plan.samples)
    ctx.batch.push_back({s.loader->source_names().at(sample.source), sample.sample_id, sample.epoch, sample.chunk});
  // The plan holds this step's global batch (train.batch_schedule or a resume may have changed it).
  const auto global_batch = static_cast<int64_t>(plan.samples.size());
  const int64_t rank_batch = global_batch / g.layout.dp();
  torch::Tensor window = s.loader->tokens(plan, g.coords.dp * rank_batch, rank_batch);  // [B/dp, T+1]
  // On a GPU the copy goes from pinned memory without blocking the host (the stream keeps it ordered).
  window = s.device.is_cuda() ? window.pin_memory().to(s.device, /*non_blocking=*/true) : window.to(s.device);
  const int64_t T = window.size(1) - 1;
  ctx.tokens = global_batch * T;
  return window;
}

torch::Tensor forward_backward(TrainerState& s, const torch::Tensor& window, torch::Tensor& own_losses,
                               torch::Tensor& sample_losses, model::ForwardStats* stats) {
  const Config& c = s.config;
  const parallel::ProcessGroups& g = s.groups;
  const int64_t micro_batch = c.rank_micro_batch();
  const int64_t microbatches = window.size(0) / micro_batch;  // the batch's share of this rank, in micro-batches
  const int64_t T = window.size(1) - 1;
  for (auto& p : s.params) p.param.mutable_grad() = torch::Tensor();
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(s.device));
  torch::Tensor z_loss_sum = torch::zeros_like(loss_sum);
  sample_losses = torch::zeros({window.size(0)}, loss_sum.options());  // [B/dp]
  parallel::PipelineStage stage;
  // Under parallel.sp the stages exchange this TP rank's share of the sequence, [b, T/tp, C].
  stage.activation_shape = {micro_batch, c.parallel.sp ? T / c.parallel.tp : T, c.model.d_model};
  stage.activation_dtype = s.compute_dtype;
  stage.device = s.device;
  stage.forward = [&](int64_t micro, const torch::Tensor& input) -> torch::Tensor {
    torch::Tensor micro_window = window.narrow(0, micro * micro_batch, micro_batch);                   // [b, T+1]
    torch::Tensor x = g.first_stage() ? s.model->embed(micro_window.narrow(1, 0, T), s.compute_dtype)  // [b, T, C]
                                      : input;
    x = s.model->run_blocks(x);  // [b, T, C]
    if (!g.last_stage()) return x;
    model::CrossEntropyParts parts = s.model->head_loss(x, micro_window.narrow(1, 1, T));
    loss_sum += parts.nll.detach();
    z_loss_sum += parts.z_loss.detach();
    sample_losses.narrow(0, micro * micro_batch, micro_batch).copy_(parts.row_nll.reshape({micro_batch, T}).mean(1));
    return parts.loss / static_cast<double>(microbatches);  // the mean over micro-batches; DP averages below
  };
  // DP overlap: during the last micro-batch's backward each gradient bucket starts its all-reduce as soon as
  // it is complete. The per-rank check below still sees this rank's own gradients: the reduced values only
  // replace .grad in all_reduce_mean().
  stage.before_backward = [&](int64_t micro) {
    if (s.reducer && micro == microbatches - 1) s.reducer->prepare_overlap();
  };
  {
    model::ForwardStatsScope stats_scope(stats);  // a stats step: the decoder records into `stats`
    parallel::run_pipeline(stage, microbatches, *g.pp, c.parallel.schedule);
  }
  // [loss, z_loss]: from the last stage to every stage, then the mean over DP replicas.
  torch::Tensor losses = torch::stack({loss_sum, z_loss_sum}) / static_cast<double>(microbatches);  // [2]
  own_losses = losses.clone();  // this rank's (zeros before the last stage)
  if (!g.pp->single()) g.pp->broadcast(losses, g.layout.pp() - 1);
  return losses;
}

std::string reduce_and_clip(TrainerState& s, StepReduction& reduction, StepRecord& r, const torch::Tensor& own_losses,
                            torch::Tensor& losses, const torch::Tensor& sample_losses) {
  sdk::StepContext& ctx = r.ctx;
  const parallel::ProcessGroups& g = s.groups;
  if (s.fault.at("nan_grad", g.rank, ctx.step) && !s.params.empty()) {  // a test's fault (trainer_state.h)
    torch::NoGradGuard no_grad;
    s.params.front().param.mutable_grad().fill_(std::numeric_limits<float>::quiet_NaN());
  }
  // First a per-rank check, before any reduction mixes ranks: name every rank whose loss or gradient is not
  // finite. Then the DP mean, the TP sum of partial gradients, and norms of the whole model, read once.
  const torch::Tensor flags = reduction.non_finite_flags(s, own_losses);
  // Always completed, even on a skipped step: buckets may already be in flight, and every rank must run the
  // same collectives.
  reduction.reduce_grads(s, losses);
  ReducedStep reduced = reduction.read(s, flags, losses, sample_losses);
  ctx.loss = reduced.loss;
  ctx.z_loss = reduced.z_loss;
  ctx.grad_norm = reduced.grad_norm;
  ctx.tensor_grad_norms = std::move(reduced.tensor_grad_norms);
  r.tensor_param_norms = std::move(reduced.tensor_param_norms);
  r.sample_losses = std::move(reduced.sample_losses);
  ctx.clip_factor = optim::clip_grads_by_global_norm(s.params, ctx.grad_norm, s.config.optim.grad_clip);
  return reduced.non_finite_ranks;
}

void transform_grads(TrainerState& s, sdk::StepContext& ctx) {
  torch::NoGradGuard no_grad;  // transforms change gradients in place
  for (auto& transform : s.plugins->grad_transforms())
    s.call(transform, ctx, [&](sdk::Plugin& p) { p.transform_grads(ctx, s.plugin_params); });
}

void decide(TrainerState& s, StepRecord& r, const std::string& non_finite_ranks) {
  sdk::StepContext& ctx = r.ctx;
  const int64_t step = ctx.step;
  const parallel::ProcessGroups& g = s.groups;
  torch::NoGradGuard no_grad;
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
    check_moment_scales(r.decision.moment_scales, handler->name(), step, s.tensor_names);
  }
  // Non-finite weights (an earlier update poisoned them: an optimizer or grad transform plugin) make every
  // later step non-finite: stop instead of skipping forever. Checked only on this rare path.
  if (r.decided_by == "keel") s.stop_if_weights_not_finite(step);
  if (!g.world->single())
    r.decision =
        decision_from_json(g.world->broadcast_string(decision_to_json(r.decision, r.decided_by), 0), r.decided_by);
  if (r.decision.action != sdk::Decision::Action::kRollback && r.decision.lr_factor != 1.0 &&
      r.decision.lr_factor_steps > 0) {
    s.lr_factor = r.decision.lr_factor;
    s.lr_factor_until = step + r.decision.lr_factor_steps;
    ctx.lr = ctx.lr * r.decision.lr_factor;
    s.event(step, "lr_factor",
            "[" + r.decided_by + "] LR x" + std::to_string(r.decision.lr_factor) + " until step " +
                std::to_string(s.lr_factor_until) + ": " + r.decision.reason);
  }
  // Moment surgery now, before this step's update (a rollback applies it after the reload, in roll_back()).
  if (r.decision.action != sdk::Decision::Action::kRollback && !r.decision.moment_scales.empty()) {
    const std::string what = apply_decision_moment_scales(s, r.decision.moment_scales, r.decided_by);
    s.event(step, "moment_scales", what);
    s.lineage.notes.push_back("step " + std::to_string(step) + ": " + what);
    s.write_lineage();
    spdlog::warn("step {}: {}", step, what);
  }
  if (r.decision.action != sdk::Decision::Action::kContinue &&
      r.decision.action != sdk::Decision::Action::kRollback) {  // a rollback logs its own event in roll_back()
    static const char* const kinds[] = {"continue", "skip", "rollback", "stop"};
    const char* kind = kinds[static_cast<int>(r.decision.action)];
    s.event(step, kind, "[" + r.decided_by + "] " + r.decision.reason);
    spdlog::warn("step {}: {} by {}: {}", step, kind, r.decided_by, r.decision.reason);
  }
}

void apply_update(TrainerState& s, StepRecord& r) {
  if (!r.updated()) return;
  torch::NoGradGuard no_grad;  // the optimizer changes the weights in place
  sdk::StepContext& ctx = r.ctx;
  s.call(s.plugins->optimizer(), ctx, [&](sdk::Plugin& p) { p.step(ctx); });
  if (s.zero_enabled()) {
    std::vector<at::Tensor> tensors;
    for (const auto& p : s.params) tensors.push_back(p.param);
    optim::broadcast_from_owners(tensors, s.zero, *s.groups.dp);
  }
}

void end_step(TrainerState& s, StepRecord& r, std::chrono::steady_clock::time_point start) {
  torch::NoGradGuard no_grad;
  sdk::StepContext& ctx = r.ctx;
  const int64_t step = ctx.step;
  // From here on the step counts: a failure stops the run after a checkpoint of this step's state.
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
  if (s.metrics) {
    row.batch = batch_record(s, ctx, r.sample_losses);  // /data/batch and /data/sample_loss, flushed with this row
    row.source_loss = source_losses(row.batch, s.loader->source_names().size());
    s.metrics->append(row);
    if (s.config.resume.verify_steps > 0) check_against_parent(s, row, r);
  }
  if (s.rank0()) metrics::throw_if_run_log_failed();  // train.log on a full disk stops the run like metrics.h5
  for (plugin_host::LoadedPlugin* p : s.plugins->all())
    s.call(*p, ctx, [&](sdk::Plugin& plugin) { plugin.on_step_end(ctx); });
  if (!ctx.activation_stats.empty()) {  // a metrics.stats_every step (step_stats.h)
    for (plugin_host::LoadedPlugin* p : s.plugins->all())
      s.call(*p, ctx, [&](sdk::Plugin& plugin) { plugin.on_stats(ctx); });
  }
}

}  // namespace keel::train

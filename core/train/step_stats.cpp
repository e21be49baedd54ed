// Why: see step_stats.h. Every rank writes what it alone knows into two flat buffers laid out for the whole model
// (rows of layers and heads, columns of tensors), a value nobody else adds twice (a max is idempotent; a sum is
// contributed by one rank of each group that holds the same value), and one max and one sum all-reduce over the
// world assemble them. Means divide by counts the host already knows (tokens x width), so no count travels.
#include "core/train/step_stats.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>

namespace keel::train {
namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Second-moment statistics of the optimizer state this rank holds, per tensor of the whole model ([n] each).
struct MomentStats {
  torch::Tensor max, neg_min, median;  // sqrt(v): max, -min, median; -inf where this rank holds no state
  torch::Tensor below, numel;          // entries with sqrt(v) < optim.eps, and all entries; counted by one rank
};

MomentStats moment_stats(TrainerState& s, sdk::StepContext& ctx, int64_t n) {
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  MomentStats m{torch::full({n}, kMinusInf, fp32), torch::full({n}, kMinusInf, fp32), torch::full({n}, kMinusInf, fp32),
                torch::zeros({n}, fp32), torch::zeros({n}, fp32)};
  const sdk::PluginState state =
      s.call(s.plugins->optimizer(), ctx, [](sdk::Plugin& p) { return p.save_state(); });  // references, no copy
  std::unordered_map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, tensor] : state.tensors) by_name[name] = &tensor;
  const parallel::ProcessGroups& g = s.groups;
  // Without ZeRO every DP rank holds the same state: DP rank 0 counts it. With ZeRO only the owner holds it.
  const bool counts_here = g.coords.tp == 0 && (s.zero_enabled() || g.coords.dp == 0);
  for (size_t i = 0; i < s.params.size(); ++i) {
    const auto it = by_name.find(s.params[i].name + "/exp_avg_sq");
    if (it == by_name.end()) continue;  // every TP rank of a group holds the same tensors' state (same ZeRO share)
    torch::Tensor root = it->second->detach().to(torch::kFloat).sqrt().reshape({-1});  // [numel] this shard
    if (s.specs[i].sharded() && g.layout.tp() > 1) root = torch::cat(g.tp->all_gather(root.contiguous()));  // whole
    const int64_t col = s.global_index[i];
    m.max.narrow(0, col, 1).copy_(root.max().reshape({1}));
    m.neg_min.narrow(0, col, 1).copy_(root.min().neg().reshape({1}));
    m.median.narrow(0, col, 1).copy_(root.median().reshape({1}));  // the lower of the two middle values
    if (!counts_here) continue;
    m.below.narrow(0, col, 1).copy_((root < s.config.optim.eps).sum().to(torch::kFloat).reshape({1}));
    m.numel.narrow(0, col, 1).fill_(static_cast<double>(root.numel()));
  }
  return m;
}

torch::Tensor nan_where_unseen(const torch::Tensor& x) {  // -inf (no rank saw it) -> NaN
  return x.masked_fill(x == kMinusInf, std::numeric_limits<float>::quiet_NaN());
}

// The whole model's statistics from the reduced buffers (see collect_stats for their layout), on the device.
sdk::NamedTensors derive(const TrainerState& s, const torch::Tensor& maxes, const torch::Tensor& sums, int64_t tokens) {
  const ModelConfig& mc = s.config.model;
  const int64_t L = mc.layers, H = mc.heads, n = static_cast<int64_t>(s.tensor_names.size());
  const double t = static_cast<double>(tokens);
  const torch::Tensor sqrt_v_min = -maxes.narrow(0, L * H + 2 + n, n);  // +inf where unseen
  sdk::NamedTensors out;
  out.emplace_back("attn_logit_max", nan_where_unseen(maxes.narrow(0, 0, L * H)).view({L, H}));             // [L, H]
  out.emplace_back("block_rms", (sums.narrow(0, 0, L) / (t * static_cast<double>(mc.d_model))).sqrt());     // [L]
  out.emplace_back("logit_mean", sums.narrow(0, L, 1) / (t * static_cast<double>(mc.vocab)));               // [1]
  out.emplace_back("logit_max", nan_where_unseen(maxes.narrow(0, L * H, 1)));                               // [1]
  out.emplace_back("z_mean", sums.narrow(0, L + 1, 1) / t);                                                 // [1]
  out.emplace_back("z_max", nan_where_unseen(maxes.narrow(0, L * H + 1, 1)));                               // [1]
  out.emplace_back("update_ratio", sums.narrow(0, L + 2, n).sqrt() / sums.narrow(0, L + 2 + n, n).sqrt());  // [n]
  out.emplace_back("sqrt_v_min",
                   sqrt_v_min.masked_fill(sqrt_v_min == -kMinusInf, std::numeric_limits<float>::quiet_NaN()));
  out.emplace_back("sqrt_v_median", nan_where_unseen(maxes.narrow(0, L * H + 2 + 2 * n, n)));            // [n]
  out.emplace_back("sqrt_v_max", nan_where_unseen(maxes.narrow(0, L * H + 2, n)));                       // [n]
  out.emplace_back("v_below_eps", sums.narrow(0, L + 2 + 2 * n, n) / sums.narrow(0, L + 2 + 3 * n, n));  // [n]
  return out;
}

// Rank 0: one host read of every statistic, buffered as this step's /stats row.
void write_row(TrainerState& s, int64_t step, const sdk::NamedTensors& stats) {
  std::vector<torch::Tensor> flat;
  for (const auto& [name, tensor] : stats) flat.push_back(tensor.reshape({-1}));
  const torch::Tensor host = torch::cat(flat).to(torch::kCPU).contiguous();  // the step's one read
  const float* data = host.data_ptr<float>();
  std::vector<std::pair<std::string, std::vector<float>>> series;
  int64_t at = 0;
  for (const auto& [name, tensor] : stats) {
    series.emplace_back(name, std::vector<float>(data + at, data + at + tensor.numel()));
    at += tensor.numel();
  }
  const auto median =
      std::find_if(series.begin(), series.end(), [](const auto& e) { return e.first == "sqrt_v_median"; });
  if (median != series.end() &&
      std::all_of(median->second.begin(), median->second.end(), [](float v) { return std::isnan(v); }))
    s.event(step, "stats",
            "optimizer " + s.plugins->optimizer().name() +
                " keeps no <param>/exp_avg_sq state: the Adam second-moment statistics are NaN");
  s.metrics->stats(step, std::move(series));
}

}  // namespace

bool stats_due(const Config& config, int64_t step) {
  return config.metrics.stats_every > 0 && step % config.metrics.stats_every == 0;
}

model::ForwardStats begin_forward_stats(const TrainerState& s) {
  return model::make_forward_stats(s.model->stage().layers, s.config.model.heads / s.groups.layout.tp(), s.device);
}

std::vector<torch::Tensor> snapshot_weights(const TrainerState& s) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out;
  out.reserve(s.params.size());
  for (const auto& p : s.params) out.push_back(p.param.detach().clone());
  return out;
}

// Buffer layout (L = model.layers, H = model.heads, n = the whole model's tensors):
//   maxes [L*H | logit_max | z_max | n sqrt(v) max | n -sqrt(v) min | n sqrt(v) median], -inf = unseen
//   sums  [L block sum of squares | logit sum | log Z sum | n ||dW||^2 | n ||W||^2 | n entries < eps | n entries]
void collect_stats(TrainerState& s, StepRecord& r, const model::ForwardStats& f,
                   const std::vector<torch::Tensor>& weights_before) {
  torch::NoGradGuard no_grad;
  const parallel::ProcessGroups& g = s.groups;
  const ModelConfig& mc = s.config.model;
  const int64_t L = mc.layers, H = mc.heads, n = static_cast<int64_t>(s.tensor_names.size());
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  torch::Tensor maxes = torch::full({L * H + 2 + 3 * n}, kMinusInf, fp32);
  torch::Tensor sums = torch::zeros({L + 2 + 4 * n}, fp32);
  const int64_t first = s.model->stage().first_layer;
  if (f.layers > 0) {
    maxes.narrow(0, 0, L * H)
        .view({L, H})
        .narrow(0, first, f.layers)
        .narrow(1, g.coords.tp * f.heads, f.heads)
        .copy_(f.attn_logit_max);
    // Each TP rank holds the whole residual stream, except under SP (its share of the sequence).
    if (s.config.parallel.sp || g.coords.tp == 0) sums.narrow(0, first, f.layers).copy_(f.block_sumsq);
  }
  if (f.recorded_head) {
    maxes.narrow(0, L * H, 1).copy_(f.logit_max.reshape({1}));
    maxes.narrow(0, L * H + 1, 1).copy_(f.z_max.reshape({1}));
    sums.narrow(0, L, 1).copy_(f.logit_sum.reshape({1}));                        // vocabulary columns: every TP rank
    if (g.coords.tp == 0) sums.narrow(0, L + 1, 1).copy_(f.z_sum.reshape({1}));  // log Z: the same on every TP rank
  }
  // ||dW|| and ||W||: the weights are the same on every DP rank after the update (ZeRO broadcasts them).
  for (size_t i = 0; g.coords.dp == 0 && i < s.params.size(); ++i) {
    if (!s.specs[i].sharded() && g.coords.tp != 0) continue;  // replicated over TP: counted once
    const torch::Tensor& before = weights_before.at(i);
    const int64_t col = s.global_index[i];
    sums.narrow(0, L + 2 + col, 1).add_((s.params[i].param - before).pow(2).sum().reshape({1}));
    sums.narrow(0, L + 2 + n + col, 1).add_(before.pow(2).sum().reshape({1}));
  }
  const MomentStats m = moment_stats(s, r.ctx, n);
  maxes.narrow(0, L * H + 2, n).copy_(m.max);
  maxes.narrow(0, L * H + 2 + n, n).copy_(m.neg_min);
  maxes.narrow(0, L * H + 2 + 2 * n, n).copy_(m.median);
  sums.narrow(0, L + 2 + 2 * n, n).copy_(m.below);
  sums.narrow(0, L + 2 + 3 * n, n).copy_(m.numel);
  if (!g.world->single()) {
    g.world->all_reduce(maxes, parallel::ReduceOp::kMax);
    g.world->all_reduce(sums, parallel::ReduceOp::kSum);
  }
  r.ctx.activation_stats = derive(s, maxes, sums, r.ctx.tokens);
  if (s.metrics) write_row(s, r.ctx.step, r.ctx.activation_stats);
}

}  // namespace keel::train

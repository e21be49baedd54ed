// Why: see forward_stats.h. Every statistic is computed from detached tensors under no-grad, on the device, and
// folded into the step's accumulator with in-place max/add: the backward graph and the losses are untouched.
#include "core/model/forward_stats.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/model/recompute.h"

namespace keel::model {
namespace {

thread_local ForwardStats* tls_stats = nullptr;

float minus_infinity() { return -std::numeric_limits<float>::infinity(); }

}  // namespace

ForwardStats make_forward_stats(int64_t layers, int64_t heads, const at::Device& device) {
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(device);
  ForwardStats s;
  s.layers = layers;
  s.heads = heads;
  s.attn_logit_max = torch::full({layers, heads}, minus_infinity(), fp32);  // [L, h]
  s.block_sumsq = torch::zeros({layers}, fp32);                             // [L]
  s.logit_sum = torch::zeros({}, fp32);
  s.logit_max = torch::full({}, minus_infinity(), fp32);
  s.z_sum = torch::zeros({}, fp32);
  s.z_max = torch::full({}, minus_infinity(), fp32);
  return s;
}

ForwardStatsScope::ForwardStatsScope(ForwardStats* stats) : saved_(tls_stats) { tls_stats = stats; }
ForwardStatsScope::~ForwardStatsScope() { tls_stats = saved_; }

ForwardStats* active_forward_stats() { return recompute_rerun_active() ? nullptr : tls_stats; }

void record_attention_logits(ForwardStats& stats, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(stats.layer >= 0 && stats.layer < stats.layers, "forward stats: block index ", stats.layer,
              " outside this stage's ", stats.layers, " blocks");
  torch::NoGradGuard no_grad;
  const int64_t B = q.size(0), T = q.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  const torch::Tensor masked = torch::ones({T, T}, q.options().dtype(torch::kBool)).triu(1);  // [T, T] future keys
  torch::Tensor head_max = torch::full({q.size(1)}, minus_infinity(), stats.attn_logit_max.options());  // [h]
  // One batch row at a time: the [h, T, T] scores of one sequence, not the [B, h, T, T] of the whole micro-batch.
  for (int64_t b = 0; b < B; ++b) {
    const torch::Tensor qf = q[b].detach().to(torch::kFloat);                                       // [h, T, D]
    const torch::Tensor kf = k[b].detach().to(torch::kFloat);                                       // [h, T, D]
    torch::Tensor scores = torch::matmul(qf, kf.transpose(-2, -1)).mul_(scale);                     // [h, T, T]
    scores.masked_fill_(masked, minus_infinity());                                                  // causal
    head_max = torch::maximum(head_max, std::get<0>(scores.reshape({scores.size(0), -1}).max(1)));  // [h]
  }
  stats.attn_logit_max[stats.layer].copy_(torch::maximum(stats.attn_logit_max[stats.layer], head_max));
}

void record_block_output(ForwardStats& stats, const at::Tensor& x) {
  TORCH_CHECK(stats.layer >= 0 && stats.layer < stats.layers, "forward stats: block index ", stats.layer,
              " outside this stage's ", stats.layers, " blocks");
  torch::NoGradGuard no_grad;
  stats.block_sumsq[stats.layer].add_(x.detach().to(torch::kFloat).pow(2).sum());
}

void record_logits(ForwardStats& stats, const at::Tensor& logits, const parallel::TensorParallel& tp) {
  torch::NoGradGuard no_grad;
  const torch::Tensor l = logits.detach().to(torch::kFloat);  // [N, V/tp]
  stats.logit_sum.add_(l.sum());
  stats.logit_max.copy_(torch::maximum(stats.logit_max, l.max()));
  torch::Tensor row_max = std::get<0>(l.max(/*dim=*/-1));  // [N] this rank's columns
  if (!tp.single()) tp.group->all_reduce(row_max, parallel::ReduceOp::kMax);
  torch::Tensor sum_exp = (l - row_max.unsqueeze(-1)).exp().sum(-1);  // [N]
  if (!tp.single()) tp.group->all_reduce(sum_exp, parallel::ReduceOp::kSum);
  const torch::Tensor log_z = sum_exp.log() + row_max;  // [N] log Z over the whole vocabulary
  stats.z_sum.add_(log_z.sum());
  stats.z_max.copy_(torch::maximum(stats.z_max, log_z.max()));
  stats.recorded_head = true;
}

}  // namespace keel::model

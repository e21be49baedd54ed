// Why: see step_reduction.h.
#include "core/train/step_reduction.h"

#include <cmath>

namespace keel::train {

at::Tensor StepReduction::non_finite_flags(TrainerState& s, const at::Tensor& own_losses) const {
  const parallel::ProcessGroups& g = s.groups;
  const auto fp32_here = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  torch::Tensor flags = torch::zeros({g.world_size()}, fp32_here);  // [world]: 1 where a rank saw a non-finite value
  std::vector<torch::Tensor> sums{own_losses.sum()};                // NaN/inf propagate through sums
  for (const auto& p : s.params) {
    if (p.param.grad().defined()) sums.push_back(p.param.grad().detach().sum().to(torch::kFloat));
  }
  flags.narrow(0, g.rank, 1).copy_(torch::isfinite(torch::stack(sums).sum()).logical_not().to(torch::kFloat).view({1}));
  return flags;
}

void StepReduction::reduce_grads(TrainerState& s, at::Tensor& losses) const {
  const parallel::ProcessGroups& g = s.groups;
  if (s.reducer) s.reducer->all_reduce_mean();
  if (!g.tp->single()) {
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (s.specs[i].grad_partial_over_tp && s.params[i].param.grad().defined())
        g.tp->all_reduce(s.params[i].param.mutable_grad());
    }
  }
  if (!g.dp->single()) {
    g.dp->all_reduce(losses);
    losses /= static_cast<double>(g.layout.dp());
  }
}

ReducedStep StepReduction::read(TrainerState& s, const at::Tensor& flags, const at::Tensor& losses,
                                const at::Tensor& sample_losses) {
  const parallel::ProcessGroups& g = s.groups;
  const bool per_tensor = s.config.metrics.per_tensor;
  std::vector<torch::Tensor> grads, weights;
  for (const auto& p : s.params) {
    grads.push_back(p.param.grad());
    weights.push_back(p.param);
  }
  const int64_t n = static_cast<int64_t>(s.tensor_names.size());
  const auto fp32_here = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  // [B]: the global batch's per-sample losses, each placed by the one rank that counts it (TP rank 0 of the
  // last stage of its DP rank), so the sum over ranks is exact: every slot gets one non-zero term.
  const int64_t B = s.loader->global_batch_at(s.loader->step() - 1);  // this step's (train.batch_schedule)
  torch::Tensor placed_samples = torch::zeros({B}, fp32_here);
  if (g.last_stage() && g.coords.tp == 0 && sample_losses.defined()) {
    const int64_t rank_batch = B / g.layout.dp();
    placed_samples.narrow(0, g.coords.dp * rank_batch, rank_batch).copy_(sample_losses);
  }
  // [world + n + n + B]: flags, gradient squares, weight squares (the weights this step's forward used; skipped
  // unless metrics.per_tensor), per-sample losses, summed over every rank in one collective. The samples go last:
  // an element of the squares still has the same terms (in a ring all-reduce the order of more than two terms
  // can follow the packet's length; the golden run's layouts have at most two).
  torch::Tensor summed =
      torch::cat({flags, placed_squares(s, grads),
                  per_tensor ? placed_squares(s, weights) : torch::zeros({n}, fp32_here), placed_samples});
  if (!g.world->single()) g.world->all_reduce(summed);
  const torch::Tensor host =
      torch::cat({summed, losses.to(torch::kFloat)}).to(torch::kCPU, torch::kDouble);  // the one read
  const double* h = host.data_ptr<double>();
  ReducedStep out;
  for (int64_t r = 0; r < g.world_size(); ++r) {
    if (h[r] > 0.0) out.non_finite_ranks += (out.non_finite_ranks.empty() ? "" : ", ") + g.layout.describe_rank(r);
  }
  const double* grad_squares = h + g.world_size();
  const double* weight_squares = grad_squares + n;
  const double* samples = weight_squares + n;
  const double* loss_values = samples + B;
  double grad_square_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) grad_square_sum += grad_squares[i];
  out.loss = loss_values[0];
  out.z_loss = loss_values[1];
  out.sample_losses.assign(samples, samples + B);  // fp32 values, exact in the double packet
  out.grad_norm = std::sqrt(grad_square_sum);
  if (per_tensor) {
    for (int64_t i = 0; i < n; ++i) {
      out.tensor_grad_norms.push_back(static_cast<float>(std::sqrt(grad_squares[i])));
      out.tensor_param_norms.push_back(static_cast<float>(std::sqrt(weight_squares[i])));
    }
  }
  return out;
}

at::Tensor StepReduction::placed_squares(TrainerState& s, const std::vector<at::Tensor>& tensors) {
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(s.device);
  at::Tensor whole = torch::zeros({static_cast<int64_t>(s.tensor_names.size())}, fp32);  // [n]
  if (tensors.empty() || s.groups.coords.dp != 0) return whole;
  if (!placement_index_.defined()) {
    std::vector<int64_t> index;
    std::vector<float> counted;
    for (size_t i = 0; i < tensors.size(); ++i) {
      index.push_back(s.global_index[i]);
      counted.push_back(s.specs[i].sharded() || s.groups.coords.tp == 0 ? 1.0f : 0.0f);
    }
    placement_index_ = torch::tensor(index, torch::kLong).to(s.device);       // [n_local]
    placement_counted_ = torch::tensor(counted, torch::kFloat).to(s.device);  // [n_local]
  }
  at::Tensor local;  // [n_local]
  if (s.device.is_cuda()) {
    // One multi-tensor kernel instead of a reduction per tensor; an undefined gradient counts as a zero (a
    // cached device scalar, so nothing is copied from the host inside the step).
    if (!zero_scalar_.defined()) zero_scalar_ = torch::zeros({}, fp32);
    std::vector<at::Tensor> all;
    for (const auto& t : tensors) all.push_back(t.defined() ? t.detach() : zero_scalar_);
    const at::Tensor norms = torch::stack(at::_foreach_norm(all, 2)).to(torch::kFloat);  // [n_local]
    local = norms * norms;
  } else {
    std::vector<at::Tensor> squares;
    for (const auto& t : tensors)
      squares.push_back(t.defined() ? t.detach().to(torch::kFloat).pow(2).sum() : torch::zeros({}, fp32));
    local = torch::stack(squares);
  }
  whole.index_add_(0, placement_index_, local * placement_counted_);
  return whole;
}

}  // namespace keel::train

// Why: see cross_entropy.h. The chunk loop (three matmuls per chunk, gradients accumulated as it goes) is shared;
// only the per-row step differs: rows_reference in LibTorch ops, or kernels/cuda/cross_entropy.cu in one launch.
// The autograd Function saves the finished gradients, so its backward is two scalings.
#include "kernels/cross_entropy.h"

#include <torch/torch.h>

#include <algorithm>

#include "keel/config.h"
#include "kernels/dispatch.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/cross_entropy.cuh"
#include "kernels/cuda_dtype.h"
#endif

namespace keel::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// For the rows of one chunk: log_z [n] and nll [n] (fp32 out), and logits [n, V] overwritten with
// d loss / d logits = (softmax (1 + 2 coef logZ) - onehot(target)) * grad_scale, in the logits' dtype; a row
// whose target is ignore_index gets nll 0 and a zero gradient.
using RowsStep = void (*)(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& log_z,
                          const at::Tensor& nll, double z_loss_coef, double grad_scale, int64_t ignore_index);

void rows_reference(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& log_z, const at::Tensor& nll,
                    double z_loss_coef, double grad_scale, int64_t ignore_index) {
  const at::Tensor ignored = targets.eq(ignore_index);                            // [n] bool
  const at::Tensor safe_targets = targets.masked_fill(ignored, 0).unsqueeze(-1);  // [n, 1] in range for gather
  at::Tensor logits_f = logits.to(at::kFloat);                                    // [n, V] fp32, this chunk only
  at::Tensor row_max = std::get<0>(logits_f.max(/*dim=*/-1, /*keepdim=*/true));   // [n, 1]
  at::Tensor chunk_log_z = (logits_f - row_max).exp().sum(-1).log() + row_max.squeeze(-1);  // [n]
  at::Tensor target_logit = logits_f.gather(-1, safe_targets).squeeze(-1);                  // [n]
  log_z.copy_(chunk_log_z);
  nll.copy_((chunk_log_z - target_logit).masked_fill_(ignored, 0.0));
  at::Tensor softmax_scale = (((2.0 * z_loss_coef) * chunk_log_z + 1.0) * grad_scale).masked_fill_(ignored, 0.0);
  at::Tensor grad = (logits_f - chunk_log_z.unsqueeze(-1)).exp_().mul_(softmax_scale.unsqueeze(-1));  // [n, V]
  at::Tensor onehot =
      at::full({targets.size(0), 1}, -grad_scale, grad.options()).masked_fill_(ignored.unsqueeze(-1), 0.0);
  grad.scatter_add_(1, safe_targets, onehot);
  logits.copy_(grad);
}

#if KEEL_WITH_CUDA
void rows_fused(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& log_z, const at::Tensor& nll,
                double z_loss_coef, double grad_scale, int64_t ignore_index) {
  TORCH_CHECK(logits.is_contiguous() && targets.is_contiguous() && log_z.is_contiguous() && nll.is_contiguous(),
              "fused_linear_cross_entropy: the CUDA kernel wants contiguous chunks");
  cuda::cross_entropy_rows(logits.data_ptr(), cuda_dtype(logits.scalar_type(), "fused_linear_cross_entropy"),
                           targets.data_ptr<int64_t>(), log_z.data_ptr<float>(), nll.data_ptr<float>(), logits.size(0),
                           logits.size(1), static_cast<float>(z_loss_coef), static_cast<float>(grad_scale),
                           ignore_index, c10::cuda::getCurrentCUDAStream().stream());
}
#endif

struct Pass {
  FusedCrossEntropy losses;
  at::Tensor grad_hidden;  // [N, C] hidden's dtype, d loss / d hidden (undefined if not asked for)
  at::Tensor grad_weight;  // [V, C] fp32, d loss / d weight (undefined if not asked for)
  // [] fp32: N / (rows not ignored, at least 1). The gradients above are scaled by 1/N as they are made (no
  // host sync for the count); the backward multiplies by this (exactly 1 when no row is ignored).
  at::Tensor grad_rescale;
};

// The whole computation, autograd off: losses, and the gradients asked for.
Pass chunked_pass(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double z_loss_coef,
                  int64_t chunk_rows, int64_t ignore_index, RowsStep rows_step, bool want_grad_hidden,
                  bool want_grad_weight) {
  at::NoGradGuard no_grad;
  const int64_t N = hidden.size(0), V = weight.size(0), C = weight.size(1);
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  at::Tensor weight_c = weight.to(hidden.scalar_type());  // [V, C] compute dtype (weight itself when fp32)
  at::Tensor log_z = at::empty({N}, f32);                 // [N]
  at::Tensor nll_rows = at::empty({N}, f32);              // [N]
  Pass pass;
  if (want_grad_hidden) pass.grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);  // [N, C]
  if (want_grad_weight) pass.grad_weight = at::zeros({V, C}, f32);                                // [V, C]
  const double grad_scale = 1.0 / static_cast<double>(N);  // the loss is a mean over N rows
  for (int64_t start = 0; start < N; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - start);
    at::Tensor hidden_chunk = hidden.narrow(0, start, n);    // [n, C]
    at::Tensor logits = at::mm(hidden_chunk, weight_c.t());  // [n, V] compute dtype
    rows_step(logits, targets.narrow(0, start, n), log_z.narrow(0, start, n), nll_rows.narrow(0, start, n), z_loss_coef,
              grad_scale, ignore_index);
    const at::Tensor& grad_logits = logits;  // [n, V], overwritten in place by rows_step
    if (want_grad_hidden) {
      at::Tensor rows = pass.grad_hidden.narrow(0, start, n);  // [n, C]
      at::mm_out(rows, grad_logits, weight_c);
    }
    if (want_grad_weight) {
      if (grad_logits.scalar_type() == at::kFloat) {
        pass.grad_weight.addmm_(grad_logits.t(), hidden_chunk);  // [V, C] += [V, n] @ [n, C]
      } else {  // a compute-dtype product (fp32 accumulation inside the GEMM), summed over chunks in fp32
        pass.grad_weight.add_(at::mm(grad_logits.t(), hidden_chunk));
      }
    }
  }
  const at::Tensor kept = targets.ne(ignore_index);                        // [N] bool
  const at::Tensor kept_rows = kept.sum().to(at::kFloat).clamp_min_(1.0);  // [] on the device, no sync
  pass.losses.nll = nll_rows.sum() / kept_rows;                            // ignored rows hold 0
  pass.losses.row_nll = nll_rows;
  pass.losses.z_loss = z_loss_coef > 0.0
                           ? z_loss_coef * (log_z.pow(2).masked_fill_(kept.logical_not(), 0.0).sum() / kept_rows)
                           : at::zeros({}, f32);
  pass.grad_rescale = at::full({}, static_cast<double>(N), f32).div_(kept_rows);  // N / N is exactly 1
  pass.losses.loss = pass.losses.nll + pass.losses.z_loss;
  return pass;
}

class LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& targets, double z_loss_coef, int64_t chunk_rows, int64_t ignore_index,
                               bool fused, bool want_grad_hidden, bool want_grad_weight) {
    RowsStep rows_step = &rows_reference;
#if KEEL_WITH_CUDA
    if (fused) rows_step = &rows_fused;
#else
    TORCH_CHECK(!fused, "fused_linear_cross_entropy: this build has no CUDA kernels");
#endif
    Pass pass = chunked_pass(hidden, weight, targets, z_loss_coef, chunk_rows, ignore_index, rows_step,
                             want_grad_hidden, want_grad_weight);
    ctx->save_for_backward({pass.grad_hidden, pass.grad_weight, pass.grad_rescale});
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    ctx->mark_non_differentiable({pass.losses.nll, pass.losses.z_loss, pass.losses.row_nll});
    return {pass.losses.loss, pass.losses.nll, pass.losses.z_loss, pass.losses.row_nll};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    // scalar: d (whatever) / d loss, times N / kept rows (the gradients were made with 1/N)
    const at::Tensor grad_loss = grad_outputs[0].to(at::kFloat) * saved[2];
    at::Tensor grad_hidden, grad_weight;
    // fp32 products, then the input's dtype: a bf16 copy of grad_loss (e.g. 1/3 for 3 micro-batches) would be off
    if (saved[0].defined()) grad_hidden = saved[0].to(at::kFloat).mul_(grad_loss).to(saved[0].scalar_type());
    if (saved[1].defined()) {
      grad_weight = (saved[1] * grad_loss).to(ctx->saved_data["weight_dtype"].toScalarType());
    }
    return {grad_hidden,  grad_weight,  at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double z_loss_coef,
                  int64_t chunk_rows, int64_t ignore_index) {
  const char* op = "fused_linear_cross_entropy";
  TORCH_CHECK(hidden.defined() && hidden.dim() == 2 && hidden.size(0) > 0, op,
              ": hidden must be [N, C] with N > 0, got ", hidden.defined() ? hidden.sizes() : at::IntArrayRef{});
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) > 0, op,
              ": weight must be [V, C] with C = hidden's ", hidden.size(1), ", got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(targets.defined() && targets.dim() == 1 && targets.size(0) == hidden.size(0), op,
              ": targets must be [N] with N = hidden's ", hidden.size(0), ", got ",
              targets.defined() ? targets.sizes() : at::IntArrayRef{});
  TORCH_CHECK(c10::isFloatingType(hidden.scalar_type()), op, ": hidden must be floating point, got ",
              hidden.scalar_type());
  TORCH_CHECK(c10::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
              weight.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device() && targets.device() == hidden.device(), op,
              ": hidden, weight and targets must be on one device, got ", hidden.device(), ", ", weight.device(), ", ",
              targets.device());
  TORCH_CHECK(z_loss_coef >= 0.0, op, ": z_loss_coef must be >= 0, got ", z_loss_coef);
  TORCH_CHECK(chunk_rows > 0, op, ": chunk_rows must be > 0, got ", chunk_rows);
  if (targets.is_cpu()) {  // a device check would wait for the GPU
    const at::Tensor kept = targets.masked_select(targets.ne(ignore_index));
    if (kept.numel() == 0) return;
    const int64_t lowest = kept.min().item<int64_t>(), highest = kept.max().item<int64_t>();
    TORCH_CHECK(lowest >= 0 && highest < weight.size(0), op, ": targets must lie in [0, ", weight.size(0),
                ") or equal ignore_index ", ignore_index, ", got values in [", lowest, ", ", highest, "]");
  }
}

FusedCrossEntropy run(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double z_loss_coef,
                      int64_t chunk_rows, int64_t ignore_index, bool fused) {
  check_inputs(hidden, weight, targets, z_loss_coef, chunk_rows, ignore_index);
  const at::Tensor targets_c = targets.contiguous();
  const bool grad_on = at::GradMode::is_enabled();
  const bool want_grad_hidden = grad_on && hidden.requires_grad();
  const bool want_grad_weight = grad_on && weight.requires_grad();
  FusedCrossEntropy out;
  if (!want_grad_hidden && !want_grad_weight) {  // evaluation: the losses only, no gradient matmuls
    RowsStep rows_step = &rows_reference;
#if KEEL_WITH_CUDA
    if (fused) rows_step = &rows_fused;
#endif
    return chunked_pass(hidden, weight, targets_c, z_loss_coef, chunk_rows, ignore_index, rows_step, false, false)
        .losses;
  }
  variable_list losses = LinearCrossEntropy::apply(hidden, weight, targets_c, z_loss_coef, chunk_rows, ignore_index,
                                                   fused, want_grad_hidden, want_grad_weight);
  out.loss = losses[0];
  out.nll = losses[1];
  out.z_loss = losses[2];
  out.row_nll = losses[3];
  return out;
}

}  // namespace

FusedCrossEntropy fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& targets, double z_loss_coef, int64_t chunk_rows,
                                             int64_t ignore_index) {
#if KEEL_WITH_CUDA
  if (use_fused(hidden)) {
    const c10::cuda::CUDAGuard device_guard(hidden.device());
    return run(hidden, weight, targets, z_loss_coef, chunk_rows, ignore_index, /*fused=*/true);
  }
#endif
  return run(hidden, weight, targets, z_loss_coef, chunk_rows, ignore_index, /*fused=*/false);
}

FusedCrossEntropy fused_linear_cross_entropy_reference(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& targets, double z_loss_coef,
                                                       int64_t chunk_rows, int64_t ignore_index) {
  return run(hidden, weight, targets, z_loss_coef, chunk_rows, ignore_index, /*fused=*/false);
}

int64_t cross_entropy_chunk_rows(int64_t rows, int64_t vocab, int64_t dim) {
  TORCH_CHECK(rows > 0 && vocab > 0 && dim > 0, "cross_entropy_chunk_rows: rows, vocab and dim must be > 0, got ", rows,
              ", ", vocab, ", ", dim);
  const int64_t vocab_over_dim = (vocab + dim - 1) / dim;
  const int64_t wanted = (rows + vocab_over_dim - 1) / vocab_over_dim;
  int64_t chunk = 1;
  while (chunk < wanted) chunk *= 2;
  return std::min(chunk, rows);
}

}  // namespace keel::kernels

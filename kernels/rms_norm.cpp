// Why: see rms_norm.h. The autograd Function picks the CUDA kernels or the reference once per call; the kernels
// save only x (its own dtype) and the per-row rstd [rows] fp32, not the fp32 copies autograd of the reference
// would keep.
#include "kernels/rms_norm.h"

#include <torch/torch.h>

#include <stdexcept>
#include <string>

#include "keel/config.h"
#include "kernels/dispatch.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/rms_norm.cuh"
#include "kernels/cuda_dtype.h"
#endif

namespace keel::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fp32 arithmetic for bf16/fp16/fp32 inputs (as the model does); fp64 stays fp64 so the tests can check the
// formulas tightly.
at::ScalarType compute_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(weight.defined(), op, ": weight is undefined");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., C] with at least one dimension, got a ", x.dim(), "-d tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1, op, ": weight must be 1-d [C], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) == x.size(-1), op, ": weight has ", weight.size(0),
              " elements but x's last dimension C is ", x.size(-1));
  TORCH_CHECK(weight.scalar_type() == compute_dtype(x), op, ": weight must be ", compute_dtype(x), " for x of dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
}

#if KEEL_WITH_CUDA
struct FusedForward {
  at::Tensor y;     // [..., C] x's dtype
  at::Tensor x;     // [..., C] contiguous (what the backward reads)
  at::Tensor rstd;  // [rows] fp32
};

FusedForward rms_norm_forward_fused(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  FusedForward out;
  out.x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  TORCH_CHECK(out.x.is_contiguous() && weight.is_contiguous(), "rms_norm: inputs must be contiguous for the kernel");
  const int64_t C = out.x.size(-1);
  const int64_t rows = out.x.numel() / C;
  out.y = at::empty(out.x.sizes(), out.x.options());
  out.rstd = at::empty({rows}, out.x.options().dtype(at::kFloat));
  cuda::rms_norm_forward(out.x.data_ptr(), weight.data_ptr<float>(), out.y.data_ptr(), out.rstd.data_ptr<float>(), rows,
                         C, static_cast<float>(eps), cuda_dtype(out.x.scalar_type(), "rms_norm"),
                         c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

RmsNormGrads rms_norm_backward_fused(const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight_in,
                                     const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();  // [..., C]
  const at::Tensor weight = weight_in.contiguous();                      // [C] fp32
  TORCH_CHECK(grad_y.is_contiguous() && x.is_contiguous() && weight.is_contiguous() && rstd.is_contiguous(),
              "rms_norm backward: tensors must be contiguous for the kernel");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "rms_norm backward: grad_y has shape ", grad_y.sizes(), " but x has ",
              x.sizes());
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  const int64_t partials = cuda::rms_norm_backward_partials(rows, C);
  RmsNormGrads grads;
  grads.x = at::empty(x.sizes(), x.options());
  grads.weight = at::empty({C}, weight.options());
  at::Tensor workspace = at::empty({partials, C}, weight.options());  // [partials, C] fp32
  cuda::rms_norm_backward(grad_y.data_ptr(), x.data_ptr(), weight.data_ptr<float>(), rstd.data_ptr<float>(),
                          grads.x.data_ptr(), grads.weight.data_ptr<float>(), workspace.data_ptr<float>(), partials,
                          rows, C, cuda_dtype(x.scalar_type(), "rms_norm"), c10::cuda::getCurrentCUDAStream().stream());
  return grads;
}
#endif

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    ctx->saved_data["eps"] = eps;
#if KEEL_WITH_CUDA
    if (use_fused(x) && has_kernel_for(x.scalar_type()) && x.numel() > 0) {
      FusedForward fused = rms_norm_forward_fused(x, weight, eps);
      ctx->save_for_backward({fused.x, weight, fused.rstd});
      return fused.y;
    }
#endif
    ctx->save_for_backward({x, weight});
    return rms_norm_reference(x, weight, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
#if KEEL_WITH_CUDA
    if (saved.size() == 3) {  // the forward ran the kernel
      RmsNormGrads grads = rms_norm_backward_fused(grad_outputs[0], saved[0], saved[1], saved[2]);
      return {grads.x, grads.weight, at::Tensor()};
    }
#endif
    RmsNormGrads grads = rms_norm_backward_reference(grad_outputs[0], saved[0], saved[1], eps);
    return {grads.x, grads.weight, at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_arguments("rms_norm", x, weight);
  return RmsNormFunction::apply(x, weight, eps);
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_arguments("rms_norm_reference", x, weight);
  const at::Tensor xf = x.to(compute_dtype(x));  // [..., C]
  return (xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight).to(x.scalar_type());
}

RmsNormGrads rms_norm_backward_reference(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         double eps) {
  check_arguments("rms_norm_backward_reference", x, weight);
  TORCH_CHECK(grad_y.defined() && grad_y.sizes() == x.sizes(), "rms_norm_backward_reference: grad_y has shape ",
              grad_y.defined() ? grad_y.sizes() : at::IntArrayRef{}, " but x has ", x.sizes());
  const at::ScalarType f = compute_dtype(x);
  const at::Tensor xf = x.to(f);                                               // [..., C]
  const at::Tensor g = grad_y.to(f);                                           // [..., C]
  const at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);  // [..., 1]
  const at::Tensor xhat = xf * r;                                              // [..., C]
  const at::Tensor gw = g * weight;                                            // [..., C]
  RmsNormGrads grads;
  grads.x = (r * (gw - xhat * (gw * xhat).mean(-1, /*keepdim=*/true))).to(x.scalar_type());
  grads.weight = (g * xhat).reshape({-1, x.size(-1)}).sum(0).to(weight.scalar_type());  // [C]
  return grads;
}

}  // namespace keel::kernels

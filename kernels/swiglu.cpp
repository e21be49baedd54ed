// Why: see swiglu.h. The autograd Function picks the CUDA kernels or the reference once per call and saves only
// gate and up: the backward recomputes sigmoid(gate) instead of keeping silu(gate).
#include "kernels/swiglu.h"

#include <torch/torch.h>

#include <stdexcept>
#include <string>

#include "keel/config.h"
#include "kernels/dispatch.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/swiglu.cuh"
#include "kernels/cuda_dtype.h"
#endif

namespace keel::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_arguments(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.defined(), op, ": gate is undefined");
  TORCH_CHECK(up.defined(), op, ": up is undefined");
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), op, ": gate must be floating point, got ", gate.scalar_type());
  TORCH_CHECK(up.sizes() == gate.sizes(), op, ": up has shape ", up.sizes(), " but gate has ", gate.sizes());
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), op, ": up is ", up.scalar_type(), " but gate is ",
              gate.scalar_type());
  TORCH_CHECK(up.device() == gate.device(), op, ": up is on ", up.device(), " but gate is on ", gate.device());
}

#if KEEL_WITH_CUDA
at::Tensor swiglu_forward_fused(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "swiglu: inputs must be contiguous for the kernel");
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  cuda::swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                       cuda_dtype(gate.scalar_type(), "swiglu"), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

SwiGluGrads swiglu_backward_fused(const at::Tensor& grad_in, const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  const at::Tensor grad = grad_in.to(gate.scalar_type()).contiguous();
  TORCH_CHECK(grad.is_contiguous() && gate.is_contiguous() && up.is_contiguous(),
              "swiglu backward: tensors must be contiguous for the kernel");
  TORCH_CHECK(grad.sizes() == gate.sizes(), "swiglu backward: grad has shape ", grad.sizes(), " but gate has ",
              gate.sizes());
  SwiGluGrads grads;
  grads.gate = at::empty(gate.sizes(), gate.options());
  grads.up = at::empty(up.sizes(), up.options());
  cuda::swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grads.gate.data_ptr(), grads.up.data_ptr(),
                        gate.numel(), cuda_dtype(gate.scalar_type(), "swiglu"),
                        c10::cuda::getCurrentCUDAStream().stream());
  return grads;
}
#endif

class SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
#if KEEL_WITH_CUDA
    if (use_fused(gate) && has_kernel_for(gate.scalar_type()) && gate.numel() > 0) {
      const at::Tensor gate_c = gate.contiguous();
      const at::Tensor up_c = up.contiguous();
      ctx->saved_data["fused"] = true;
      ctx->save_for_backward({gate_c, up_c});
      return swiglu_forward_fused(gate_c, up_c);
    }
#endif
    ctx->saved_data["fused"] = false;
    ctx->save_for_backward({gate, up});
    return swiglu_reference(gate, up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
#if KEEL_WITH_CUDA
    if (ctx->saved_data["fused"].toBool()) {
      SwiGluGrads grads = swiglu_backward_fused(grad_outputs[0], saved[0], saved[1]);
      return {grads.gate, grads.up};
    }
#endif
    SwiGluGrads grads = swiglu_backward_reference(grad_outputs[0], saved[0], saved[1]);
    return {grads.gate, grads.up};
  }
};

}  // namespace

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_arguments("swiglu", gate, up);
  return SwiGluFunction::apply(gate, up);
}

at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up) {
  check_arguments("swiglu_reference", gate, up);
  return at::silu(gate) * up;
}

SwiGluGrads swiglu_backward_reference(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_arguments("swiglu_backward_reference", gate, up);
  TORCH_CHECK(grad.defined() && grad.sizes() == gate.sizes(), "swiglu_backward_reference: grad has shape ",
              grad.defined() ? grad.sizes() : at::IntArrayRef{}, " but gate has ", gate.sizes());
  const at::ScalarType f = gate.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad.to(f);  // like gate
  const at::Tensor gate_f = gate.to(f);
  const at::Tensor up_f = up.to(f);
  const at::Tensor s = at::sigmoid(gate_f);  // sigmoid(gate)
  SwiGluGrads grads;
  grads.gate = (g * up_f * s * (1.0 + gate_f * (1.0 - s))).to(gate.scalar_type());
  grads.up = (g * gate_f * s).to(up.scalar_type());
  return grads;
}

}  // namespace keel::kernels

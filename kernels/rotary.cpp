// Why: see rotary.h. The autograd Function picks the CUDA kernel or the reference once per call; it saves only the
// tables (the backward of a rotation does not need x).
#include "kernels/rotary.h"

#include <torch/torch.h>

#include <stdexcept>
#include <string>

#include "keel/config.h"
#include "kernels/dispatch.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/rotary.cuh"
#include "kernels/cuda_dtype.h"
#endif

namespace keel::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     int64_t rotary_dims) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(cos.defined(), op, ": cos is undefined");
  TORCH_CHECK(sin.defined(), op, ": sin is undefined");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d [B, T, H, D], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  const int64_t T = x.size(1), D = x.size(3);
  TORCH_CHECK(rotary_dims >= 0 && rotary_dims <= D && rotary_dims % 2 == 0, op,
              ": rotary_dims must be even and in [0, D = ", D, "], got ", rotary_dims);
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(table.dim() == 2 && table.size(0) >= T && table.size(1) == rotary_dims / 2, op, ": ", name,
                " must be [T_max >= T = ", T, ", rotary_dims/2 = ", rotary_dims / 2, "], got shape ", table.sizes());
    TORCH_CHECK(table.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", table.scalar_type());
    TORCH_CHECK(!table.requires_grad(), op, ": ", name, " is a constant table and must not require grad");
  }
}

// The first T rows of a table, [1, T, 1, R/2], in `dtype` on `device`.
at::Tensor table_rows(const at::Tensor& table, int64_t T, at::Device device, at::ScalarType dtype) {
  return table.narrow(0, 0, T).to(device, dtype).view({1, T, 1, table.size(1)});
}

// Rotation by +angle (sin_sign = 1) or -angle (sin_sign = -1); the reference math of core/model/ops.cpp.
at::Tensor rotate_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dims,
                            double sin_sign) {
  const int64_t T = x.size(1);
  const int64_t half = rotary_dims / 2;
  const at::ScalarType f = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rot = x.narrow(-1, 0, rotary_dims).to(f);  // [B, T, H, R]
  at::Tensor x1 = rot.narrow(-1, 0, half);              // [B, T, H, R/2]
  at::Tensor x2 = rot.narrow(-1, half, half);
  at::Tensor c = table_rows(cos, T, x.device(), f);  // [1, T, 1, R/2]
  at::Tensor s = table_rows(sin, T, x.device(), f);
  if (sin_sign < 0) s = -s;
  at::Tensor rotated = at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1).to(x.scalar_type());
  if (rotary_dims == x.size(-1)) return rotated;
  return at::cat({rotated, x.narrow(-1, rotary_dims, x.size(-1) - rotary_dims)}, -1);
}

#if KEEL_WITH_CUDA
// x: [B, T, H, D] on a GPU; cos, sin: [T_max, R/2] fp32 contiguous on the same GPU.
at::Tensor rotate_fused(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dims,
                        float sin_sign) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();  // [B, T, H, D]
  TORCH_CHECK(x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "apply_rotary: tensors must be contiguous for the kernel");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "apply_rotary: the kernel wants fp32 tables on x's device");
  at::Tensor out = at::empty(x.sizes(), x.options());
  cuda::rotary_apply(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr(), x.size(0), x.size(1),
                     x.size(2), x.size(3), rotary_dims, sin_sign, cuda_dtype(x.scalar_type(), "apply_rotary"),
                     c10::cuda::getCurrentCUDAStream().stream());
  return out;
}
#endif

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            int64_t rotary_dims) {
    ctx->saved_data["rotary_dims"] = rotary_dims;
#if KEEL_WITH_CUDA
    if (use_fused(x) && has_kernel_for(x.scalar_type()) && x.numel() > 0) {
      const at::Tensor cos_d = cos.to(x.device(), at::kFloat).contiguous();  // no copy if already there
      const at::Tensor sin_d = sin.to(x.device(), at::kFloat).contiguous();
      ctx->saved_data["fused"] = true;
      ctx->save_for_backward({cos_d, sin_d});
      return rotate_fused(x, cos_d, sin_d, rotary_dims, 1.0f);
    }
#endif
    ctx->saved_data["fused"] = false;
    ctx->save_for_backward({cos, sin});
    return rotate_reference(x, cos, sin, rotary_dims, 1.0);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t rotary_dims = ctx->saved_data["rotary_dims"].toInt();
#if KEEL_WITH_CUDA
    if (ctx->saved_data["fused"].toBool()) {
      return {rotate_fused(grad_outputs[0], saved[0], saved[1], rotary_dims, -1.0f), at::Tensor(), at::Tensor(),
              at::Tensor()};
    }
#endif
    return {apply_rotary_backward_reference(grad_outputs[0], saved[0], saved[1], rotary_dims), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dims) {
  check_arguments("apply_rotary", x, cos, sin, rotary_dims);
  if (rotary_dims == 0) return x;
  return RotaryFunction::apply(x, cos, sin, rotary_dims);
}

at::Tensor apply_rotary_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  int64_t rotary_dims) {
  check_arguments("apply_rotary_reference", x, cos, sin, rotary_dims);
  if (rotary_dims == 0) return x;
  return rotate_reference(x, cos, sin, rotary_dims, 1.0);
}

at::Tensor apply_rotary_backward_reference(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t rotary_dims) {
  check_arguments("apply_rotary_backward_reference", grad, cos, sin, rotary_dims);
  if (rotary_dims == 0) return grad;
  return rotate_reference(grad, cos, sin, rotary_dims, -1.0);
}

}  // namespace keel::kernels

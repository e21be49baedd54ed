// Why: see optimizer_step.h. The references below must stay the exact op sequence of the plugins' own loops
// (tests/unit/test_kernel_optimizer.cpp checks bitwise equality on CPU); the fused path only gathers raw
// pointers and host scalars, so it never waits on the device.
#include "kernels/optimizer_step.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "keel/config.h"
#include "kernels/dispatch.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/optimizer_step.cuh"
#endif

namespace keel::kernels {
namespace {

struct NamedList {
  const char* name;
  const std::vector<at::Tensor>* tensors;
};

// Every list as long as params, every tensor defined, fp32, shaped and placed like its param.
void check_lists(const char* op, const std::vector<NamedList>& lists, const std::vector<bool>& decay) {
  const std::vector<at::Tensor>& params = *lists.front().tensors;
  for (const NamedList& list : lists) {
    TORCH_CHECK(list.tensors->size() == params.size(), op, ": ", list.name, " has ", list.tensors->size(),
                " tensors but params has ", params.size());
  }
  TORCH_CHECK(decay.size() == params.size(), op, ": decay has ", decay.size(), " flags but params has ", params.size(),
              " tensors");
  for (size_t i = 0; i < params.size(); ++i) {
    for (const NamedList& list : lists) {
      const at::Tensor& t = (*list.tensors)[i];
      TORCH_CHECK(t.defined(), op, ": ", list.name, "[", i, "] is undefined");
      TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", list.name, "[", i, "] is ", t.scalar_type(),
                  ", expected fp32");
      TORCH_CHECK(t.sizes() == params[i].sizes(), op, ": ", list.name, "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has ", params[i].sizes());
      TORCH_CHECK(t.device() == params[i].device(), op, ": ", list.name, "[", i, "] is on ", t.device(), " but params[",
                  i, "] is on ", params[i].device());
    }
  }
}

void check_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<bool>& decay, const AdamWHyper& hyper) {
  check_lists("adamw_step",
              {{"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs}}, decay);
  TORCH_CHECK(hyper.step >= 1, "adamw_step: hyper.step must be >= 1 (the count including this update), got ",
              hyper.step);
}

void check_lion(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay) {
  check_lists("lion_step", {{"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}}, decay);
}

#if KEEL_WITH_CUDA
// The fused kernels take contiguous CUDA tensors on the device of params[0]; anything else takes the reference.
bool fusable(const std::vector<NamedList>& lists) {
  const std::vector<at::Tensor>& params = *lists.front().tensors;
  if (params.empty() || !use_fused(params.front())) return false;
  for (const NamedList& list : lists) {
    for (const at::Tensor& t : *list.tensors) {
      if (!t.is_cuda() || !t.is_contiguous() || t.device() != params.front().device()) return false;
    }
  }
  return true;
}

std::vector<float*> pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<float*> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.data_ptr<float>());
  return out;
}

std::vector<int64_t> sizes_of(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.numel());
  return out;
}

// What each param is multiplied by before its update: the reference's mul_(1 - lr * wd), rounded to fp32.
std::vector<float> decay_factors(const std::vector<bool>& decay, double lr, double weight_decay) {
  std::vector<float> out;
  out.reserve(decay.size());
  for (bool d : decay) out.push_back(d && weight_decay != 0.0 ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f);
  return out;
}
#endif

}  // namespace

void adamw_step_reference(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const std::vector<bool>& decay, const AdamWHyper& hyper) {
  check_adamw(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
  // From here on, plugins/adamw/adamw.cpp's step(), op for op.
  const double lr = hyper.lr;
  const double bias_correction1 = 1.0 - std::pow(hyper.beta1, static_cast<double>(hyper.step));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(hyper.beta2, static_cast<double>(hyper.step)));
  const double step_size = lr / bias_correction1;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    if (decay[i] && hyper.weight_decay != 0.0) param.mul_(1.0 - lr * hyper.weight_decay);
    exp_avgs[i].lerp_(grad, 1.0 - hyper.beta1);
    exp_avg_sqs[i].mul_(hyper.beta2).addcmul_(grad, grad, 1.0 - hyper.beta2);
    at::Tensor denom = (exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(hyper.eps);
    param.addcdiv_(exp_avgs[i], denom, -step_size);
  }
}

void lion_step_reference(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay,
                         const LionHyper& hyper) {
  check_lion(params, grads, exp_avgs, decay);
  // From here on, plugins/lion/lion.cpp's step(), op for op.
  const double lr = hyper.lr;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    // [param shape], each in {-1, 0, 1}
    at::Tensor update = exp_avgs[i].mul(hyper.beta1).add_(grad, 1.0 - hyper.beta1).sign_();
    if (decay[i] && hyper.weight_decay != 0.0) param.mul_(1.0 - lr * hyper.weight_decay);
    param.add_(update, -lr);
    exp_avgs[i].mul_(hyper.beta2).add_(grad, 1.0 - hyper.beta2);
  }
}

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<bool>& decay, const AdamWHyper& hyper) {
#if KEEL_WITH_CUDA
  check_adamw(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
  if (fusable({{"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs}})) {
    const double bias_correction1 = 1.0 - std::pow(hyper.beta1, static_cast<double>(hyper.step));
    cuda::AdamWScalars scalars;
    scalars.one_minus_beta1 = static_cast<float>(1.0 - hyper.beta1);
    scalars.beta2 = static_cast<float>(hyper.beta2);
    scalars.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
    scalars.eps = static_cast<float>(hyper.eps);
    scalars.neg_step_size = static_cast<float>(-hyper.lr / bias_correction1);
    scalars.bias_correction2_sqrt =
        static_cast<float>(std::sqrt(1.0 - std::pow(hyper.beta2, static_cast<double>(hyper.step))));
    const std::vector<float*> p = pointers(params), g = pointers(grads), m = pointers(exp_avgs),
                              v = pointers(exp_avg_sqs);
    const std::vector<int64_t> sizes = sizes_of(params);
    const std::vector<float> factors = decay_factors(decay, hyper.lr, hyper.weight_decay);
    const c10::cuda::CUDAGuard device_guard(params.front().device());
    cuda::adamw_step(p.data(), g.data(), m.data(), v.data(), sizes.data(), factors.data(),
                     static_cast<int64_t>(params.size()), scalars, c10::cuda::getCurrentCUDAStream().stream());
    return;
  }
#endif
  adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
}

void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay, const LionHyper& hyper) {
#if KEEL_WITH_CUDA
  check_lion(params, grads, exp_avgs, decay);
  if (fusable({{"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}})) {
    cuda::LionScalars scalars;
    scalars.neg_lr = static_cast<float>(-hyper.lr);
    scalars.beta1 = static_cast<float>(hyper.beta1);
    scalars.one_minus_beta1 = static_cast<float>(1.0 - hyper.beta1);
    scalars.beta2 = static_cast<float>(hyper.beta2);
    scalars.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
    const std::vector<float*> p = pointers(params), g = pointers(grads), m = pointers(exp_avgs);
    const std::vector<int64_t> sizes = sizes_of(params);
    const std::vector<float> factors = decay_factors(decay, hyper.lr, hyper.weight_decay);
    const c10::cuda::CUDAGuard device_guard(params.front().device());
    cuda::lion_step(p.data(), g.data(), m.data(), sizes.data(), factors.data(), static_cast<int64_t>(params.size()),
                    scalars, c10::cuda::getCurrentCUDAStream().stream());
    return;
  }
#endif
  lion_step_reference(params, grads, exp_avgs, decay, hyper);
}

}  // namespace keel::kernels

// Why: see host_kernels.h. The adapters only copy the SDK's hyper-parameters into the kernels' own struct (the
// same fields), so a plugin's update is exactly kernels::adamw_step / kernels::lion_step.
#include "core/plugin_host/host_kernels.h"

#include "kernels/optimizer_step.h"

namespace keel::plugin_host {
namespace {

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<bool>& decay, const sdk::AdamWHyper& h) {
  kernels::AdamWHyper hyper;
  hyper.lr = h.lr;
  hyper.beta1 = h.beta1;
  hyper.beta2 = h.beta2;
  hyper.eps = h.eps;
  hyper.weight_decay = h.weight_decay;
  hyper.step = h.step;
  kernels::adamw_step(params, grads, exp_avgs, exp_avg_sqs, decay, hyper);
}

void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay, const sdk::LionHyper& h) {
  kernels::LionHyper hyper;
  hyper.lr = h.lr;
  hyper.beta1 = h.beta1;
  hyper.beta2 = h.beta2;
  hyper.weight_decay = h.weight_decay;
  kernels::lion_step(params, grads, exp_avgs, decay, hyper);
}

}  // namespace

const sdk::HostKernels* host_kernels() {
  static const sdk::HostKernels table = [] {
    sdk::HostKernels t;
    t.adamw_step = &adamw_step;
    t.lion_step = &lion_step;
    return t;
  }();
  return &table;
}

}  // namespace keel::plugin_host

// Why: the multi-tensor AdamW/Lion kernels stand in for the optimizer plugins' own loops on a GPU, so (1) their
// reference must be those loops bit for bit (checked on CPU against the built-in plugins, loaded as the trainer
// loads them, over several steps with weight decay on and off), (2) bad lists must be refused naming the
// argument, and (3) on a GPU the fused kernels must match the reference, over many odd-sized and misaligned
// tensors (several launches, a tensor split across launches), also when reached through a plugin.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/plugin_host/host_kernels.h"
#include "core/plugin_host/plugin_library.h"
#include "kernels/dispatch.h"
#include "kernels/optimizer_step.h"
#include "tests/unit/test_support.h"

namespace keel::kernels {

namespace {

using keel::testing::error_of;

std::shared_ptr<sdk::Plugin> load_optimizer(const std::string& name, const sdk::Args& args) {
  using plugin_host::PluginLibrary;
  return PluginLibrary::load(plugin_host::resolve_plugin_path(name))->create(args);
}

std::vector<torch::Tensor> clones(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

// A few params of odd shapes (one decayed matrix, one norm-like vector, one 3-d) and their state.
struct Model {
  std::vector<torch::Tensor> params, exp_avgs, exp_avg_sqs;
  std::vector<bool> decay;
  std::vector<std::string> names;

  explicit Model(torch::Device device, const std::vector<std::vector<int64_t>>& shapes, uint64_t seed) {
    torch::manual_seed(seed);
    for (size_t i = 0; i < shapes.size(); ++i) {
      params.push_back(torch::randn(shapes[i]).to(device));
      exp_avgs.push_back(torch::zeros(shapes[i]).to(device));
      exp_avg_sqs.push_back(torch::zeros(shapes[i]).to(device));
      decay.push_back(i % 3 != 1);
      names.push_back("p" + std::to_string(i));
    }
  }
  std::vector<torch::Tensor> grads(uint64_t seed) const {
    torch::manual_seed(seed);
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(torch::randn(p.sizes()).to(p.device()) * 0.1);
    return out;
  }
  // The same params, bound to a plugin as Keel binds them: fp32 leaves requiring grad.
  std::vector<sdk::Param> plugin_params() const {
    std::vector<sdk::Param> out;
    for (size_t i = 0; i < params.size(); ++i) {
      out.push_back(sdk::Param{names[i], params[i].detach().clone().set_requires_grad(true), decay[i]});
    }
    return out;
  }
};

const std::vector<std::vector<int64_t>> kSmallShapes = {{7, 5}, {13}, {3, 4, 2}, {1}};

const torch::Tensor& state_tensor(const sdk::PluginState& state, const std::string& name) {
  for (const auto& [n, t] : state.tensors) {
    if (n == name) return t;
  }
  throw std::runtime_error("no state tensor " + name);
}

// Runs `steps` plugin steps (kernels = `kernels`) and as many reference steps on a copy; both see the same grads.
template <typename ReferenceStep>
void expect_plugin_loop_is_the_reference(const std::string& plugin, const sdk::Args& args, int steps,
                                         const sdk::HostKernels* kernels, ReferenceStep reference_step,
                                         bool second_moment) {
  Model model(torch::kCPU, kSmallShapes, 1);
  auto optimizer = load_optimizer(plugin, args);
  std::vector<sdk::Param> bound = model.plugin_params();
  optimizer->bind(bound);
  torch::NoGradGuard no_grad;  // as the trainer calls optimizer plugins
  for (int s = 1; s <= steps; ++s) {
    const std::vector<torch::Tensor> grads = model.grads(100 + s);
    for (size_t i = 0; i < bound.size(); ++i) bound[i].param.mutable_grad() = grads[i].clone();
    sdk::StepContext ctx;
    ctx.lr = 0.01 * s;  // a schedule: the LR changes every step
    ctx.kernels = kernels;
    optimizer->step(ctx);
    reference_step(model, grads, ctx.lr, s);
  }
  const sdk::PluginState state = optimizer->save_state();
  for (size_t i = 0; i < bound.size(); ++i) {
    const std::string& name = model.names[i];
    EXPECT_TRUE(torch::equal(bound[i].param.detach(), model.params[i])) << plugin << " " << name;
    EXPECT_TRUE(torch::equal(state_tensor(state, name + "/exp_avg"), model.exp_avgs[i])) << plugin << " " << name;
    if (second_moment) {
      EXPECT_TRUE(torch::equal(state_tensor(state, name + "/exp_avg_sq"), model.exp_avg_sqs[i]))
          << plugin << " " << name;
    }
  }
}

TEST(KernelOptimizer, AdamWReferenceIsThePluginLoopBitForBit) {
  for (const char* wd : {"0.1", "0"}) {
    const sdk::Args args = {{"beta1", "0.9"}, {"beta2", "0.95"}, {"eps", "1e-8"}, {"weight_decay", wd}};
    auto hyper = [&](double lr, int step) {
      AdamWHyper h;
      h.lr = lr;
      h.beta1 = 0.9;
      h.beta2 = 0.95;
      h.eps = 1e-8;
      h.weight_decay = std::stod(wd);
      h.step = step;
      return h;
    };
    auto reference = [&](Model& m, const std::vector<torch::Tensor>& grads, double lr, int step) {
      adamw_step_reference(m.params, grads, m.exp_avgs, m.exp_avg_sqs, m.decay, hyper(lr, step));
    };
    // Without host kernels, and with them: on CPU params the plugin keeps its own loop either way.
    expect_plugin_loop_is_the_reference("adamw", args, 4, nullptr, reference, true);
    expect_plugin_loop_is_the_reference("adamw", args, 4, plugin_host::host_kernels(), reference, true);
    // And the dispatching entry point is the reference on CPU.
    auto dispatched = [&](Model& m, const std::vector<torch::Tensor>& grads, double lr, int step) {
      adamw_step(m.params, grads, m.exp_avgs, m.exp_avg_sqs, m.decay, hyper(lr, step));
    };
    expect_plugin_loop_is_the_reference("adamw", args, 4, nullptr, dispatched, true);
  }
}

TEST(KernelOptimizer, LionReferenceIsThePluginLoopBitForBit) {
  for (const char* wd : {"0.3", "0"}) {
    const sdk::Args args = {{"beta1", "0.9"}, {"beta2", "0.99"}, {"weight_decay", wd}};
    auto reference = [&](Model& m, const std::vector<torch::Tensor>& grads, double lr, int) {
      LionHyper h;
      h.lr = lr;
      h.beta1 = 0.9;
      h.beta2 = 0.99;
      h.weight_decay = std::stod(wd);
      lion_step_reference(m.params, grads, m.exp_avgs, m.decay, h);
    };
    expect_plugin_loop_is_the_reference("lion", args, 4, nullptr, reference, false);
    expect_plugin_loop_is_the_reference("lion", args, 4, plugin_host::host_kernels(), reference, false);
    auto dispatched = [&](Model& m, const std::vector<torch::Tensor>& grads, double lr, int) {
      LionHyper h;
      h.lr = lr;
      h.beta1 = 0.9;
      h.beta2 = 0.99;
      h.weight_decay = std::stod(wd);
      lion_step(m.params, grads, m.exp_avgs, m.decay, h);
    };
    expect_plugin_loop_is_the_reference("lion", args, 4, nullptr, dispatched, false);
  }
}

TEST(KernelOptimizer, WeightDecayOnlyTouchesDecayedParams) {
  // Zero gradients and moments: AdamW's update is 0, so each param is only scaled by 1 - lr wd, or not at all.
  Model model(torch::kCPU, {{4}, {4}}, 2);
  model.decay = {true, false};
  const std::vector<torch::Tensor> before = clones(model.params);
  AdamWHyper h;
  h.lr = 0.5;
  h.weight_decay = 0.2;
  torch::NoGradGuard no_grad;
  adamw_step(model.params, {torch::zeros({4}), torch::zeros({4})}, model.exp_avgs, model.exp_avg_sqs, model.decay, h);
  EXPECT_TRUE(torch::allclose(model.params[0], before[0] * 0.9));
  EXPECT_TRUE(torch::equal(model.params[1], before[1]));
}

TEST(KernelOptimizer, BadListsAreRefusedNamingTheArgument) {
  Model model(torch::kCPU, {{3}, {2, 2}}, 3);
  const std::vector<torch::Tensor> grads = model.grads(4);
  AdamWHyper adamw;
  LionHyper lion;
  auto adamw_error = [&](const std::vector<torch::Tensor>& g, const std::vector<torch::Tensor>& m,
                         const std::vector<bool>& decay, const AdamWHyper& h) {
    return error_of([&] { adamw_step(model.params, g, m, model.exp_avg_sqs, decay, h); });
  };
  EXPECT_NE(adamw_error({grads[0]}, model.exp_avgs, model.decay, adamw).find("grads has 1 tensors but params has 2"),
            std::string::npos);
  EXPECT_NE(adamw_error(grads, {model.exp_avgs[0]}, model.decay, adamw).find("exp_avgs has 1 tensors"),
            std::string::npos);
  EXPECT_NE(adamw_error(grads, model.exp_avgs, {true}, adamw).find("decay has 1 flags but params has 2"),
            std::string::npos);
  EXPECT_NE(adamw_error({grads[0], grads[0]}, model.exp_avgs, model.decay, adamw).find("grads[1] has shape [3]"),
            std::string::npos);
  EXPECT_NE(adamw_error({grads[0], grads[1].to(torch::kDouble)}, model.exp_avgs, model.decay, adamw)
                .find("grads[1] is Double, expected fp32"),
            std::string::npos);
  EXPECT_NE(adamw_error({grads[0], torch::Tensor()}, model.exp_avgs, model.decay, adamw).find("grads[1] is undefined"),
            std::string::npos);
  AdamWHyper step_zero;
  step_zero.step = 0;
  EXPECT_NE(adamw_error(grads, model.exp_avgs, model.decay, step_zero).find("hyper.step must be >= 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              lion_step(model.params, grads, {model.exp_avgs[1], model.exp_avgs[1]}, model.decay, lion);
            }).find("lion_step: exp_avgs[0] has shape [2, 2] but params[0] has [3]"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { lion_step_reference(model.params, grads, model.exp_avgs, {}, lion); }).find("decay has 0 flags"),
      std::string::npos);
}

// The SDK's table (core/plugin_host/host_kernels.h) runs these very functions: the same update, bit for bit.
TEST(KernelOptimizer, HostKernelTableRunsTheseFunctions) {
  const sdk::HostKernels* table = plugin_host::host_kernels();
  ASSERT_NE(table, nullptr);
  EXPECT_EQ(table, plugin_host::host_kernels());  // one table for the program's life
  ASSERT_NE(table->adamw_step, nullptr);
  ASSERT_NE(table->lion_step, nullptr);
  Model direct(torch::kCPU, {{3}, {2, 2}}, 5), lent(torch::kCPU, {{3}, {2, 2}}, 5);
  const std::vector<torch::Tensor> grads = direct.grads(6);
  sdk::AdamWHyper sdk_adamw;
  sdk_adamw.lr = 1e-2;
  sdk_adamw.beta1 = 0.8;
  sdk_adamw.beta2 = 0.9;
  sdk_adamw.eps = 1e-6;
  sdk_adamw.weight_decay = 0.1;
  sdk_adamw.step = 3;
  AdamWHyper adamw;
  adamw.lr = 1e-2;
  adamw.beta1 = 0.8;
  adamw.beta2 = 0.9;
  adamw.eps = 1e-6;
  adamw.weight_decay = 0.1;
  adamw.step = 3;
  adamw_step(direct.params, grads, direct.exp_avgs, direct.exp_avg_sqs, direct.decay, adamw);
  table->adamw_step(lent.params, grads, lent.exp_avgs, lent.exp_avg_sqs, lent.decay, sdk_adamw);
  sdk::LionHyper sdk_lion;
  sdk_lion.lr = 1e-3;
  sdk_lion.beta1 = 0.7;
  sdk_lion.beta2 = 0.95;
  sdk_lion.weight_decay = 0.2;
  LionHyper lion;
  lion.lr = 1e-3;
  lion.beta1 = 0.7;
  lion.beta2 = 0.95;
  lion.weight_decay = 0.2;
  lion_step(direct.params, grads, direct.exp_avgs, direct.decay, lion);
  table->lion_step(lent.params, grads, lent.exp_avgs, lent.decay, sdk_lion);
  for (size_t i = 0; i < direct.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(direct.params[i], lent.params[i])) << i;
    EXPECT_TRUE(torch::equal(direct.exp_avgs[i], lent.exp_avgs[i])) << i;
    EXPECT_TRUE(torch::equal(direct.exp_avg_sqs[i], lent.exp_avg_sqs[i])) << i;
  }
  // A bad list through the table is refused by the kernel, naming the argument.
  EXPECT_NE(error_of([&] {
              table->adamw_step(lent.params, {grads[0]}, lent.exp_avgs, lent.exp_avg_sqs, lent.decay, sdk_adamw);
            }).find("grads has 1 tensors but params has 2"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------------- on a GPU

bool have_gpu_kernels() { return torch::cuda::is_available() && cuda_kernels_built(); }
constexpr const char* kNoGpu = "needs a CUDA device and a build with kernels/cuda (KEEL_CUDA=ON)";

// Sizes that exercise the kernel's corners: odd sizes (scalar tails), 60 tensors (> the 36/48 of one launch),
// one tensor of 21M elements (> 320 chunks of 65536: split across launches), and views at an odd offset
// (contiguous but not 16-byte aligned: the scalar path).
struct GpuProblem {
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  std::vector<bool> decay;
};

GpuProblem gpu_problem(uint64_t seed) {
  torch::manual_seed(seed);
  GpuProblem p;
  std::vector<int64_t> sizes;
  for (int i = 0; i < 60; ++i) sizes.push_back(1 + (i * 7919) % 5003);
  sizes.push_back(320 * 65536 + 12345);
  sizes.push_back(65536);
  auto misaligned = [](int64_t n) {  // a contiguous view starting one float into its storage
    return torch::randn({n + 1}, torch::kCUDA).narrow(0, 1, n);
  };
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = sizes[i];
    const bool odd_offset = i % 11 == 5;
    p.params.push_back(odd_offset ? misaligned(n) : torch::randn({n}, torch::kCUDA));
    p.grads.push_back(odd_offset ? misaligned(n) : torch::randn({n}, torch::kCUDA));
    p.exp_avgs.push_back(torch::randn({n}, torch::kCUDA) * 0.1);
    p.exp_avg_sqs.push_back(torch::rand({n}, torch::kCUDA) * 0.01);
    p.decay.push_back(i % 2 == 0);
  }
  return p;
}

std::vector<torch::Tensor> to_cpu(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.to(torch::kCPU).contiguous());
  return out;
}

void expect_lists_close(const std::vector<torch::Tensor>& actual, const std::vector<torch::Tensor>& expected,
                        double rtol, double atol, const std::string& label) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_TRUE(torch::allclose(actual[i].to(torch::kCPU), expected[i], rtol, atol))
        << label << "[" << i << "] max diff " << (actual[i].to(torch::kCPU) - expected[i]).abs().max().item<double>();
  }
}

TEST(KernelOptimizer, FusedAdamWMatchesTheReference) {
  if (!have_gpu_kernels()) GTEST_SKIP() << kNoGpu;
  torch::NoGradGuard no_grad;
  GpuProblem gpu = gpu_problem(21);
  std::vector<torch::Tensor> params = to_cpu(gpu.params), exp_avgs = to_cpu(gpu.exp_avgs),
                             exp_avg_sqs = to_cpu(gpu.exp_avg_sqs);
  for (int step = 1; step <= 3; ++step) {
    AdamWHyper h;
    h.lr = 1e-3 * step;
    h.weight_decay = 0.1;
    h.step = step;
    adamw_step(gpu.params, gpu.grads, gpu.exp_avgs, gpu.exp_avg_sqs, gpu.decay, h);  // fused
    adamw_step_reference(params, to_cpu(gpu.grads), exp_avgs, exp_avg_sqs, gpu.decay, h);
  }
  torch::cuda::synchronize();
  expect_lists_close(gpu.params, params, 1e-5, 1e-6, "adamw params");
  expect_lists_close(gpu.exp_avgs, exp_avgs, 1e-5, 1e-7, "adamw exp_avgs");
  expect_lists_close(gpu.exp_avg_sqs, exp_avg_sqs, 1e-5, 1e-9, "adamw exp_avg_sqs");
}

TEST(KernelOptimizer, FusedLionMatchesTheReference) {
  if (!have_gpu_kernels()) GTEST_SKIP() << kNoGpu;
  torch::NoGradGuard no_grad;
  GpuProblem gpu = gpu_problem(22);
  std::vector<torch::Tensor> params = to_cpu(gpu.params), exp_avgs = to_cpu(gpu.exp_avgs);
  const double lr = 1e-3;
  for (int step = 1; step <= 3; ++step) {
    LionHyper h;
    h.lr = lr;
    h.weight_decay = 0.3;
    lion_step(gpu.params, gpu.grads, gpu.exp_avgs, gpu.decay, h);
    lion_step_reference(params, to_cpu(gpu.grads), exp_avgs, gpu.decay, h);
  }
  torch::cuda::synchronize();
  expect_lists_close(gpu.exp_avgs, exp_avgs, 1e-5, 1e-7, "lion exp_avgs");
  // A param moves by exactly lr per step in the sign's direction; a sign can only differ where beta1 m +
  // (1 - beta1) g rounds across zero, which leaves a difference of lr or 2 lr in a vanishing share of elements.
  int64_t total = 0, off = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    torch::Tensor diff = (gpu.params[i].to(torch::kCPU) - params[i]).abs();
    total += diff.numel();
    off += (diff > 1e-6 + 1e-5 * params[i].abs()).sum().item<int64_t>();
  }
  EXPECT_LE(off, total / 100000) << off << " of " << total << " Lion params differ beyond fp32 rounding";
}

// The plugins' fused path (ctx.kernels set, CUDA params) against their own loop on the same CUDA params.
TEST(KernelOptimizer, PluginsTakeTheHostKernelsOnAGpu) {
  if (!have_gpu_kernels()) GTEST_SKIP() << kNoGpu;
  for (const std::string plugin : {"adamw", "lion"}) {
    Model model(torch::kCUDA, {{31, 17}, {1025}, {4, 4}}, 5);
    auto with_kernels = load_optimizer(plugin, {{"weight_decay", "0.1"}});
    auto with_loop = load_optimizer(plugin, {{"weight_decay", "0.1"}});
    std::vector<sdk::Param> fused_params = model.plugin_params(), loop_params = model.plugin_params();
    with_kernels->bind(fused_params);
    with_loop->bind(loop_params);
    torch::NoGradGuard no_grad;
    for (int s = 0; s < 3; ++s) {
      const std::vector<torch::Tensor> grads = model.grads(200 + s);
      for (size_t i = 0; i < grads.size(); ++i) {
        fused_params[i].param.mutable_grad() = grads[i].clone();
        loop_params[i].param.mutable_grad() = grads[i].clone();
      }
      sdk::StepContext ctx;
      ctx.lr = 1e-3;
      ctx.kernels = plugin_host::host_kernels();
      with_kernels->step(ctx);
      ctx.kernels = nullptr;
      with_loop->step(ctx);
    }
    for (size_t i = 0; i < fused_params.size(); ++i) {
      torch::Tensor a = fused_params[i].param.detach().cpu(), b = loop_params[i].param.detach().cpu();
      EXPECT_LE((a - b).abs().max().item<double>(), plugin == "lion" ? 2.5e-3 : 1e-5) << plugin << " " << i;
      EXPECT_LT((a - b).abs().gt(1e-5).sum().item<int64_t>(), 3) << plugin << " " << i;
    }
  }
}

}  // namespace
}  // namespace keel::kernels

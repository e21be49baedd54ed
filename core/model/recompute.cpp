// Why: see recompute.h. The state that travels from a block's forward to its backward (the block itself and, for
// selective, the kept GEMM outputs) rides in the autograd context as a capsule, like the TP group in
// core/parallel/tp_ops.cpp, so it is freed with the graph. Which GEMM outputs are recorded or replayed is decided by
// a thread-local scope: the block's forward and its re-run happen on one thread, and the ranks of a multi-rank
// unit test are threads, each with its own scope.
#include "core/model/recompute.h"

#include <torch/torch.h>

#include <vector>

namespace keel::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kept GEMM outputs of one block call, in the order the forward produced them.
struct KeptOutputs {
  std::vector<torch::Tensor> outputs;  // each [..., out] in the compute dtype
  size_t next = 0;                     // the next one to hand out while replaying
};

enum class KeepMode { kOff, kRecord, kReplay };

thread_local KeptOutputs* tls_kept = nullptr;
thread_local KeepMode tls_mode = KeepMode::kOff;
thread_local bool tls_rerun = false;  // a recomputing backward is re-running a block's forward

// Sets the thread's record/replay scope for the lifetime of the object (nesting restores the outer one).
class KeepScope {
 public:
  KeepScope(KeptOutputs* kept, KeepMode mode) : saved_kept_(tls_kept), saved_mode_(tls_mode) {
    tls_kept = kept;
    tls_mode = kept ? mode : KeepMode::kOff;
  }
  ~KeepScope() {
    tls_kept = saved_kept_;
    tls_mode = saved_mode_;
  }
  KeepScope(const KeepScope&) = delete;
  KeepScope& operator=(const KeepScope&) = delete;

 private:
  KeptOutputs* saved_kept_;
  KeepMode saved_mode_;
};

// What a recomputed block's backward needs besides its input.
struct BlockState : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> block;
  Recompute policy = Recompute::kFull;
  KeptOutputs kept;  // selective only
};

BlockState& block_state(AutogradContext* ctx) {
  c10::intrusive_ptr<torch::CustomClassHolder> holder = ctx->saved_data.at("block").toCapsule();
  return *static_cast<BlockState*>(holder.get());
}

class RecomputedBlock : public torch::autograd::Function<RecomputedBlock> {
 public:
  // Runs with grad mode off (as every custom Function's forward): nothing inside the block is kept by autograd.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const c10::intrusive_ptr<BlockState>& state) {
    torch::Tensor y;
    {
      KeepScope scope(state->policy == Recompute::kSelective ? &state->kept : nullptr, KeepMode::kRecord);
      y = state->block(x);  // [B, T, C]
    }
    ctx->save_for_backward({x});
    ctx->saved_data["block"] = c10::IValue::make_capsule(state);
    return y;
  }

  // Re-runs the block with grad mode on from a detached copy of its input, then back-propagates through that
  // graph: the weights' gradients accumulate into their .grad as in a plain backward, the input's comes back.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    BlockState& state = block_state(ctx);
    const torch::Tensor x = ctx->get_saved_variables().at(0);  // [B, T, C]
    torch::Tensor input = x.detach().requires_grad_(true);
    torch::Tensor y;
    {
      torch::AutoGradMode grad_on(true);
      state.kept.next = 0;
      KeepScope scope(state.policy == Recompute::kSelective ? &state.kept : nullptr, KeepMode::kReplay);
      const bool outer_rerun = tls_rerun;
      tls_rerun = true;
      try {
        y = state.block(input);  // [B, T, C], the same bits as the forward's
      } catch (...) {
        tls_rerun = outer_rerun;
        throw;
      }
      tls_rerun = outer_rerun;
    }
    TORCH_CHECK(state.kept.next == state.kept.outputs.size(), "recompute: the block's re-run used ", state.kept.next,
                " of its ", state.kept.outputs.size(), " kept GEMM outputs (the forward is not pure)");
    state.kept.outputs.clear();  // this micro-batch's kept outputs are no longer needed
    torch::autograd::backward({y}, {grad_outputs.at(0)});
    return {input.grad(), torch::Tensor()};
  }
};

// The replayed GEMM: forward hands out the kept output; backward is that of x.matmul(w.t()) as at::linear runs it
// (folded to [N, in] x [in, out]; the gradient kernels autograd's mm backward picks for these layouts).
struct GradMap : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> map;  // null: the identity
};

class ReplayedGemm : public torch::autograd::Function<ReplayedGemm> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w, torch::Tensor kept,
                               const c10::intrusive_ptr<GradMap>& grad_map) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["grad_map"] = c10::IValue::make_capsule(grad_map);
    return kept;  // [..., out]
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];  // [..., in]
    const torch::Tensor& w = saved[1];  // [out, in]
    c10::intrusive_ptr<torch::CustomClassHolder> holder = ctx->saved_data.at("grad_map").toCapsule();
    const GradMap& grad_map = *static_cast<GradMap*>(holder.get());
    torch::Tensor grad_y = grad_outputs.at(0);                   // [..., out] (under SP: this rank's rows)
    if (grad_map.map) grad_y = grad_map.map(grad_y);             // [..., out] of the matmul itself
    const torch::Tensor grad = grad_y.reshape({-1, w.size(0)});  // [N, out]
    torch::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) grad_x = grad.mm(w).view(x.sizes());               // [..., in]
    if (ctx->needs_input_grad(1)) grad_w = grad.t().mm(x.reshape({-1, w.size(1)}));  // [out, in]
    return {grad_x, grad_w, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor run_recomputed(Recompute policy, const std::function<torch::Tensor(const torch::Tensor&)>& block,
                             const torch::Tensor& x) {
  if (policy == Recompute::kNone || !torch::GradMode::is_enabled() || !x.requires_grad()) return block(x);
  auto state = c10::make_intrusive<BlockState>();
  state->block = block;
  state->policy = policy;
  return RecomputedBlock::apply(x, state);
}

bool recompute_rerun_active() { return tls_rerun; }

torch::Tensor kept_gemm(const torch::Tensor& x, const torch::Tensor& w,
                        const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& compute,
                        const std::function<torch::Tensor(const torch::Tensor&)>& output_grad_to_gemm) {
  switch (tls_mode) {
    case KeepMode::kOff:
      return compute(x, w);
    case KeepMode::kRecord: {
      torch::Tensor y = compute(x, w);  // [..., out]
      tls_kept->outputs.push_back(y);
      return y;
    }
    case KeepMode::kReplay: {
      TORCH_CHECK(tls_kept->next < tls_kept->outputs.size(), "recompute: the block's re-run asked for GEMM output ",
                  tls_kept->next + 1, " but its forward kept ", tls_kept->outputs.size(), " (the forward is not pure)");
      torch::Tensor kept = tls_kept->outputs[tls_kept->next++];
      auto grad_map = c10::make_intrusive<GradMap>();
      grad_map->map = output_grad_to_gemm;
      return ReplayedGemm::apply(x, w, kept, grad_map);
    }
  }
  return compute(x, w);
}

}  // namespace keel::model

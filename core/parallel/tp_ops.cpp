// Why: see tp_ops.h. Each operator is a torch::autograd::Function whose backward needs the TP communicator;
// the group travels from forward to backward inside the autograd context (as a capsule, the one non-tensor
// IValue both LibTorch 1.13 and 2.x accept), so a graph never outlives the group it reduces over.
#include "core/parallel/tp_ops.h"

#include <torch/torch.h>

#include <stdexcept>

namespace keel::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The TP communicator, kept alive by the autograd graph until its backward has run.
struct SavedGroup : torch::CustomClassHolder {
  explicit SavedGroup(std::shared_ptr<Communicator> group) : group(std::move(group)) {}
  std::shared_ptr<Communicator> group;
};

void save_group(AutogradContext* ctx, const TensorParallel& tp) {
  ctx->saved_data["tp_group"] = c10::IValue::make_capsule(c10::make_intrusive<SavedGroup>(tp.group));
}

Communicator& saved_group(AutogradContext* ctx) {
  c10::intrusive_ptr<torch::CustomClassHolder> holder = ctx->saved_data.at("tp_group").toCapsule();
  return *static_cast<SavedGroup*>(holder.get())->group;
}

// A contiguous copy of `x` summed over the group (the communicator reduces in place).
torch::Tensor summed_over_group(const torch::Tensor& x, Communicator& group) {
  torch::Tensor sum = x.clone(at::MemoryFormat::Contiguous);  // same shape as x
  group.all_reduce(sum, ReduceOp::kSum);
  return sum;
}

class CopyToTpRegion : public torch::autograd::Function<CopyToTpRegion> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const TensorParallel& tp) {
    save_group(ctx, tp);
    return x;  // [...] unchanged (autograd wraps a returned input as a view with this node as its grad_fn)
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    torch::Tensor grad_x = summed_over_group(grad_outputs[0], saved_group(ctx));  // [...] full gradient
    return {grad_x, torch::Tensor()};
  }
};

class ReduceFromTpRegion : public torch::autograd::Function<ReduceFromTpRegion> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const TensorParallel& tp) {
    (void)ctx;
    return summed_over_group(x, *tp.group);  // [...] sum of every rank's partial
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    (void)ctx;
    return {grad_outputs[0], torch::Tensor()};  // [...] already the same on every rank
  }
};

// [B, T/tp, ...] from every rank -> [B, T, ...] in rank order.
torch::Tensor gathered_over_sequence(const torch::Tensor& x, Communicator& group) {
  return torch::cat(group.all_gather(x.contiguous()), /*dim=*/1);
}

// [B, T, ...] partial sums -> [B, T/tp, ...] this rank's part of the sum. Gloo in LibTorch 1.13 has no
// reduce-scatter, so this is the all-reduce and a copy of the part (the full sum is freed on return).
torch::Tensor reduce_scattered_over_sequence(const torch::Tensor& x, Communicator& group) {
  const int64_t T = x.size(1);
  TORCH_CHECK(T % group.size() == 0, "sequence parallelism: the sequence (", T,
              ") does not divide by the tensor-parallel size (", group.size(), ")");
  const int64_t part = T / group.size();
  return summed_over_group(x, group).narrow(1, group.rank() * part, part).clone(at::MemoryFormat::Contiguous);
}

class GatherFromSequenceRegion : public torch::autograd::Function<GatherFromSequenceRegion> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const TensorParallel& tp) {
    save_group(ctx, tp);
    return gathered_over_sequence(x, *tp.group);  // [B, T, ...]
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {reduce_scattered_over_sequence(grad_outputs[0], saved_group(ctx)), torch::Tensor()};  // [B, T/tp, ...]
  }
};

class ReduceScatterToSequenceRegion : public torch::autograd::Function<ReduceScatterToSequenceRegion> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const TensorParallel& tp) {
    save_group(ctx, tp);
    return reduce_scattered_over_sequence(x, *tp.group);  // [B, T/tp, ...]
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {gathered_over_sequence(grad_outputs[0], saved_group(ctx)), torch::Tensor()};  // [B, T, ...]
  }
};

}  // namespace

void require_tp_group(const TensorParallel& tp, const std::string& who) {
  if (tp.size < 1 || tp.rank < 0 || tp.rank >= tp.size)
    throw std::invalid_argument(who + ": tensor-parallel rank " + std::to_string(tp.rank) + " of size " +
                                std::to_string(tp.size) + " is not a valid position");
  if (tp.single()) return;
  if (!tp.group)
    throw std::invalid_argument(who + ": tensor-parallel size " + std::to_string(tp.size) +
                                " needs the TP communicator (TensorParallel::group is null)");
  if (tp.group->size() != tp.size || tp.group->rank() != tp.rank)
    throw std::invalid_argument(who + ": TensorParallel says rank " + std::to_string(tp.rank) + " of " +
                                std::to_string(tp.size) + ", but its group " + tp.group->name() + " is rank " +
                                std::to_string(tp.group->rank()) + " of " + std::to_string(tp.group->size()));
}

at::Tensor copy_to_tp_region(const at::Tensor& x, const TensorParallel& tp) {
  if (tp.single()) return x;
  return CopyToTpRegion::apply(x, tp);
}

at::Tensor reduce_from_tp_region(const at::Tensor& x, const TensorParallel& tp) {
  if (tp.single()) return x;
  return ReduceFromTpRegion::apply(x, tp);
}

at::Tensor gather_from_sequence_region(const at::Tensor& x, const TensorParallel& tp) {
  if (tp.single()) return x;
  return GatherFromSequenceRegion::apply(x, tp);
}

at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& x, const TensorParallel& tp) {
  if (tp.single()) return x;
  return ReduceScatterToSequenceRegion::apply(x, tp);
}

}  // namespace keel::parallel

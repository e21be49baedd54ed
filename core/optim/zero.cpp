// Why: see zero.h.
#include "core/optim/zero.h"

#include <torch/torch.h>

#include <algorithm>
#include <numeric>
#include <tuple>

namespace keel::optim {

std::vector<int64_t> ZeroPartition::owned_by(int64_t dp_rank) const {
  std::vector<int64_t> indices;
  for (size_t k = 0; k < owner.size(); ++k)
    if (owner[k] == dp_rank) indices.push_back(static_cast<int64_t>(k));
  return indices;
}

ZeroPartition partition_for_zero(const std::vector<int64_t>& numels, int64_t dp_size) {
  TORCH_CHECK(dp_size >= 1, "partition_for_zero: dp_size must be >= 1, got ", dp_size);
  std::vector<int64_t> order(numels.size());  // parameter indices, largest first, ties by index
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return numels[static_cast<size_t>(a)] > numels[static_cast<size_t>(b)];
  });
  std::vector<int64_t> load(static_cast<size_t>(dp_size), 0);  // elements owned per rank
  ZeroPartition partition;
  partition.owner.assign(numels.size(), 0);
  for (int64_t index : order) {
    const int64_t numel = numels[static_cast<size_t>(index)];
    TORCH_CHECK(numel >= 0, "partition_for_zero: parameter ", index, " has ", numel, " elements");
    // min_element returns the first minimum: ties go to the lower rank.
    const auto least = std::min_element(load.begin(), load.end());
    partition.owner[static_cast<size_t>(index)] = static_cast<int64_t>(least - load.begin());
    *least += numel;
  }
  return partition;
}

void broadcast_from_owners(std::vector<at::Tensor>& params, const ZeroPartition& partition, parallel::Communicator& dp,
                           int64_t coalesce_below_numel) {
  TORCH_CHECK(partition.owner.size() == params.size(), "broadcast_from_owners: the partition covers ",
              partition.owner.size(), " parameters, got ", params.size());
  if (dp.single()) return;
  at::NoGradGuard no_grad;

  // Small parameters, grouped by (owner, dtype, device) in index order: the same groups on every rank.
  struct Packed {
    int64_t owner = 0;
    std::vector<size_t> members;  // parameter indices
    at::Tensor flat;              // [sum of numels]
  };
  std::vector<Packed> packed;
  std::vector<parallel::PendingWork> works;
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t owner = partition.owner[k];
    TORCH_CHECK(owner >= 0 && owner < dp.size(), "broadcast_from_owners: parameter ", k, " is owned by rank ", owner,
                ", the DP group has ", dp.size());
    at::Tensor values = params[k].detach();  // shares storage with the parameter
    if (values.numel() >= coalesce_below_numel) {
      works.push_back(dp.broadcast_async(values, owner));  // in place
      continue;
    }
    auto group = std::find_if(packed.begin(), packed.end(), [&](const Packed& g) {
      const at::Tensor& first = params[g.members.front()];
      return g.owner == owner && first.scalar_type() == values.scalar_type() && first.device() == values.device();
    });
    if (group == packed.end()) group = packed.insert(packed.end(), Packed{owner, {}, {}});
    group->members.push_back(k);
  }
  for (auto& group : packed) {
    std::vector<at::Tensor> pieces;  // each [numel]
    for (size_t k : group.members) pieces.push_back(params[k].detach().reshape({-1}));
    group.flat = at::cat(pieces);  // the owner's values; overwritten on the other ranks
    works.push_back(dp.broadcast_async(group.flat, group.owner));
  }
  for (auto& work : works) work.wait();
  for (auto& group : packed) {
    if (group.owner == dp.rank()) continue;
    int64_t offset = 0;
    for (size_t k : group.members) {
      at::Tensor values = params[k].detach();
      values.copy_(group.flat.narrow(0, offset, values.numel()).view(values.sizes()));
      offset += values.numel();
    }
  }
}

}  // namespace keel::optim

// Why: see resharding.h. Each tensor is assembled from its pieces; coverage is counted element by element
// (pieces of one tensor never overlap: replicated tensors are written by one rank only), so a missing or
// doubled piece is an error, not a silently zero or overwritten block.
#include "core/checkpoint/resharding.h"

#include <torch/torch.h>

#include <map>

#include "core/checkpoint/checkpoint_error.h"

namespace keel::checkpoint {
namespace {

struct Assembly {
  at::Tensor full;
  int64_t covered = 0;
  std::string first_file;
};

// Adds every tensor of `pieces` (placements under `prefix`) into `assembled`, preserving first-seen order.
void add_pieces(const NamedTensors& pieces, const std::map<std::string, Placement>& placement,
                const std::string& prefix, const std::string& file, std::map<std::string, Assembly>& assembled,
                std::vector<std::string>& order) {
  for (const auto& [name, piece] : pieces) {
    const auto it = placement.find(prefix + name);
    const std::vector<int64_t> global = it != placement.end() ? it->second.global_shape : piece.sizes().vec();
    const std::vector<int64_t> offset =
        it != placement.end() ? it->second.offset : std::vector<int64_t>(piece.dim(), 0);
    auto [slot, inserted] = assembled.try_emplace(name);
    Assembly& a = slot->second;
    if (inserted) {
      a.full = torch::zeros(global, piece.options());
      a.first_file = file;
      order.push_back(name);
    } else if (a.full.sizes().vec() != global || a.full.scalar_type() != piece.scalar_type()) {
      throw CheckpointError(file + ": tensor '" + prefix + name + "' has global shape " +
                            c10::str(at::IntArrayRef(global)) + " " + c10::toString(piece.scalar_type()) + ", but " +
                            a.first_file + " says " + c10::str(a.full.sizes()) + " " +
                            c10::toString(a.full.scalar_type()));
    }
    at::Tensor target = a.full;
    for (int64_t d = 0; d < piece.dim(); ++d) target = target.narrow(d, offset[d], piece.size(d));
    target.copy_(piece);
    a.covered += piece.numel();
  }
}

NamedTensors finish(std::map<std::string, Assembly>& assembled, const std::vector<std::string>& order,
                    const std::string& dir, const std::string& prefix) {
  NamedTensors out;
  for (const auto& name : order) {
    Assembly& a = assembled.at(name);
    if (a.covered != a.full.numel()) {
      throw CheckpointError(dir + ": tensor '" + prefix + name + "' is covered by " + std::to_string(a.covered) +
                            " elements of its rank files' pieces, but has " + std::to_string(a.full.numel()) +
                            (a.covered < a.full.numel() ? " (a rank file is missing a shard)" : " (pieces overlap)"));
    }
    out.emplace_back(name, a.full);
  }
  return out;
}

}  // namespace

TrainingState read_full_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank) {
  const int64_t world = manifest.layout.world_size();
  std::map<std::string, Assembly> model, optimizer;
  std::vector<std::string> model_order, optimizer_order;
  TrainingState full;  // rank 0's metadata: step, tokens, optimizer name/step/json, schedule, ledger, config, ...
  at::Tensor cpu_rng;
  std::vector<at::Tensor> cuda_rng;
  for (int64_t rank = 0; rank < world; ++rank) {
    const ManifestFile* file = manifest.rank_file(rank);
    if (!file) throw CheckpointError(dir + ": the manifest lists no file for rank " + std::to_string(rank));
    const std::string path = dir + "/" + file->name;
    TrainingState part = read_rank_file(path);
    if (part.step != manifest.step) {
      throw CheckpointError(path + ": step " + std::to_string(part.step) + " but the manifest says " +
                            std::to_string(manifest.step));
    }
    add_pieces(part.model, part.placement, "model/", path, model, model_order);
    add_pieces(part.optimizer, part.placement, "optimizer/", path, optimizer, optimizer_order);
    if (rank == rng_rank) {
      cpu_rng = part.cpu_rng;
      cuda_rng = part.cuda_rng;
    }
    if (rank == 0) {
      part.model.clear();
      part.optimizer.clear();
      part.placement.clear();
      full = std::move(part);
    }
  }
  full.cpu_rng = cpu_rng;
  full.cuda_rng = cuda_rng;
  full.model = finish(model, model_order, dir, "model/");
  full.optimizer = finish(optimizer, optimizer_order, dir, "optimizer/");
  return full;
}

}  // namespace keel::checkpoint

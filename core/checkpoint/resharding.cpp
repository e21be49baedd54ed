// Why: see resharding.h. Each tensor is assembled from its pieces; coverage is counted element by element
// (pieces of one tensor never overlap: replicated tensors are written by one rank only), so a missing or
// doubled piece is an error, not a silently zero or overwritten block. The lazy reader keeps, per tensor, the
// list of its pieces (file, dataset, shape, offset) in the placeholder's storage, so the placeholder and
// every view of it carry their source wherever the caller passes them, and nothing outlives them.
#include "core/checkpoint/resharding.h"

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/h5_file.h"

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

namespace {

// The per-rank loop both readers share: every rank file the manifest lists, read by `read` (with or without its
// tensor bytes) and its step checked against the manifest, handed to `add`; the result carries rank 0's metadata
// (step, tokens, optimizer name/step/json, schedule, ledger, config, ...) and rng_rank's RNG states.
TrainingState read_ranks(const std::string& dir, const Manifest& manifest, int64_t rng_rank,
                         TrainingState (*read)(const std::string&),
                         const std::function<void(const TrainingState&, const std::string&)>& add) {
  const int64_t world = manifest.layout.world_size();
  TrainingState full;
  at::Tensor cpu_rng;
  std::vector<at::Tensor> cuda_rng;
  for (int64_t rank = 0; rank < world; ++rank) {
    const ManifestFile* file = manifest.rank_file(rank);
    if (!file) throw CheckpointError(dir + ": the manifest lists no file for rank " + std::to_string(rank));
    const std::string path = dir + "/" + file->name;
    TrainingState part = read(path);
    if (part.step != manifest.step) {
      throw CheckpointError(path + ": step " + std::to_string(part.step) + " but the manifest says " +
                            std::to_string(manifest.step));
    }
    add(part, path);
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
  return full;
}

}  // namespace

TrainingState read_full_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank) {
  std::map<std::string, Assembly> model, optimizer;
  std::vector<std::string> model_order, optimizer_order;
  TrainingState full =
      read_ranks(dir, manifest, rng_rank, &read_rank_file, [&](const TrainingState& part, const std::string& path) {
        add_pieces(part.model, part.placement, "model/", path, model, model_order);
        add_pieces(part.optimizer, part.placement, "optimizer/", path, optimizer, optimizer_order);
      });
  full.model = finish(model, model_order, dir, "model/");
  full.optimizer = finish(optimizer, optimizer_order, dir, "optimizer/");
  return full;
}

// ------------------------------------------------------------------------------------------- streaming reads

namespace {

struct Piece {
  std::string file, object;  // rank file and dataset
  std::vector<int64_t> shape, offset;
};

// What a placeholder stands for: one model or optimizer tensor and the pieces it is stored in.
struct LazyTensor {
  std::string key;  // "model/<param>" or "optimizer/<param>/<state>", for messages
  std::string dir;
  std::vector<int64_t> global;
  at::ScalarType type = at::kFloat;
  std::vector<Piece> pieces;
  int64_t covered = 0;
};

void delete_lazy(void* context) { delete static_cast<LazyTensor*>(context); }

DType dtype_of(at::ScalarType type, const std::string& where) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kLong:
      return DType::kInt64;
    case at::kInt:
      return DType::kInt32;
    case at::kByte:
      return DType::kUInt8;
    default:
      throw CheckpointError(where + ": dtype " + c10::toString(type) + " is not one a checkpoint stores");
  }
}

int64_t volume(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * std::max<int64_t>(shape[d], 1);
  return strides;
}

// A meta tensor of the global shape whose storage owns `lazy` (freed with the last view of it).
at::Tensor placeholder(std::unique_ptr<LazyTensor> lazy) {
  at::Tensor t = at::empty(lazy->global, at::TensorOptions().dtype(lazy->type).device(at::kMeta));  // [global]
  t.storage().set_data_ptr_noswap(c10::DataPtr(nullptr, lazy.release(), &delete_lazy, c10::Device(c10::kMeta)));
  return t;
}

// Records the pieces of `part` (one rank file's meta tensors, datasets under `group`) in `lazy`.
void add_lazy_pieces(const NamedTensors& part, const std::map<std::string, Placement>& placement,
                     const std::string& prefix, const std::string& group, const std::string& file,
                     const std::string& dir, std::map<std::string, std::unique_ptr<LazyTensor>>& lazy,
                     std::vector<std::string>& order) {
  for (const auto& [name, piece] : part) {
    const auto it = placement.find(prefix + name);
    const std::vector<int64_t> shape = piece.sizes().vec();
    const std::vector<int64_t> global = it != placement.end() ? it->second.global_shape : shape;
    const std::vector<int64_t> offset = it != placement.end() ? it->second.offset : std::vector<int64_t>(shape.size());
    auto& slot = lazy[name];
    if (!slot) {
      slot = std::make_unique<LazyTensor>();
      slot->key = prefix + name;
      slot->dir = dir;
      slot->global = global;
      slot->type = piece.scalar_type();
      order.push_back(name);
    } else if (slot->global != global || slot->type != piece.scalar_type()) {
      throw CheckpointError(file + ": tensor '" + prefix + name + "' has global shape " +
                            c10::str(at::IntArrayRef(global)) + " " + c10::toString(piece.scalar_type()) + ", but " +
                            slot->pieces.front().file + " says " + c10::str(at::IntArrayRef(slot->global)) + " " +
                            c10::toString(slot->type));
    }
    slot->pieces.push_back({file, group + name, shape, offset});
    slot->covered += volume(shape);
  }
}

NamedTensors finish_lazy(std::map<std::string, std::unique_ptr<LazyTensor>>& lazy,
                         const std::vector<std::string>& order, const std::string& dir, const std::string& prefix) {
  NamedTensors out;
  for (const auto& name : order) {
    std::unique_ptr<LazyTensor>& t = lazy.at(name);
    const int64_t numel = volume(t->global);
    if (t->covered != numel) {
      throw CheckpointError(dir + ": tensor '" + prefix + name + "' is covered by " + std::to_string(t->covered) +
                            " elements of its rank files' pieces, but has " + std::to_string(numel) +
                            (t->covered < numel ? " (a rank file is missing a shard)" : " (pieces overlap)"));
    }
    out.emplace_back(name, placeholder(std::move(t)));
  }
  return out;
}

}  // namespace

TrainingState read_lazy_state(const std::string& dir, const Manifest& manifest, int64_t rng_rank) {
  std::map<std::string, std::unique_ptr<LazyTensor>> model, optimizer;
  std::vector<std::string> model_order, optimizer_order;
  TrainingState full = read_ranks(
      dir, manifest, rng_rank, &read_rank_file_shapes, [&](const TrainingState& part, const std::string& path) {
        add_lazy_pieces(part.model, part.placement, "model/", "/model/", path, dir, model, model_order);
        add_lazy_pieces(part.optimizer, part.placement, "optimizer/", "/optimizer/state/", path, dir, optimizer,
                        optimizer_order);
      });
  full.model = finish_lazy(model, model_order, dir, "model/");
  full.optimizer = finish_lazy(optimizer, optimizer_order, dir, "optimizer/");
  return full;
}

namespace {

// The box [start, start + count) of the global tensor that `view` (of a placeholder of `lazy`) shows.
void view_box(const at::Tensor& view, const LazyTensor& lazy, std::vector<int64_t>& start,
              std::vector<int64_t>& count) {
  const std::vector<int64_t> strides = contiguous_strides(lazy.global);
  const auto rank = static_cast<int64_t>(lazy.global.size());
  if (view.dim() != rank) {
    throw CheckpointError(lazy.dir + ": tensor '" + lazy.key + "': a view of rank " + std::to_string(view.dim()) +
                          " of its placeholder of rank " + std::to_string(rank) +
                          " cannot be read (only views that narrow dimensions)");
  }
  count = view.sizes().vec();
  start.assign(static_cast<size_t>(rank), 0);
  int64_t rest = view.storage_offset();
  for (int64_t d = 0; d < rank; ++d) {
    if (count[d] > 1 && view.stride(d) != strides[d]) {
      throw CheckpointError(lazy.dir + ": tensor '" + lazy.key +
                            "': a strided or permuted view of its placeholder cannot be read");
    }
    start[d] = rest / strides[d];
    rest %= strides[d];
    if (start[d] + count[d] > lazy.global[d]) {
      throw CheckpointError(lazy.dir + ": tensor '" + lazy.key + "': view outside its global shape " +
                            c10::str(at::IntArrayRef(lazy.global)));
    }
  }
}

// The placeholder behind meta tensor `t`, or CheckpointError.
const LazyTensor& lazy_of(const at::Tensor& t) {
  const c10::DataPtr& data = t.storage().data_ptr();
  if (data.get_deleter() != &delete_lazy) {
    throw CheckpointError("a meta tensor of shape " + c10::str(t.sizes()) +
                          " is not a checkpoint placeholder (an operation copied it and lost its source)");
  }
  return *static_cast<const LazyTensor*>(data.get_context());
}

// Reads the part meta view `t` shows into `out`, a contiguous CPU tensor of its shape and dtype.
void read_part(const at::Tensor& t, const at::Tensor& out) {
  const LazyTensor& lazy = lazy_of(t);
  std::vector<int64_t> start, count;
  view_box(t, lazy, start, count);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const DType dtype = dtype_of(lazy.type, lazy.dir + ": tensor '" + lazy.key + "'");
  std::map<std::string, std::unique_ptr<H5Reader>> readers;  // each overlapping rank file opened once
  int64_t covered = 0;
  for (const Piece& p : lazy.pieces) {
    std::vector<int64_t> from(count.size()), n(count.size()), to(count.size());
    bool overlaps = true;
    for (size_t d = 0; d < count.size(); ++d) {
      const int64_t lo = std::max(start[d], p.offset[d]);
      const int64_t hi = std::min(start[d] + count[d], p.offset[d] + p.shape[d]);
      overlaps = overlaps && hi > lo;
      from[d] = lo - p.offset[d];
      to[d] = lo - start[d];
      n[d] = hi - lo;
    }
    if (!overlaps) continue;
    auto& reader = readers[p.file];
    if (!reader) reader = std::make_unique<H5Reader>(p.file);
    reader->read_region(p.object, dtype, from, n, out.data_ptr(), count, to);
    covered += volume(n);
  }
  if (covered != numel) {
    throw CheckpointError(lazy.dir + ": tensor '" + lazy.key + "': the part at " + c10::str(at::IntArrayRef(start)) +
                          " of shape " + c10::str(at::IntArrayRef(count)) + " is covered by " +
                          std::to_string(covered) + " of its " + std::to_string(numel) +
                          " elements by the rank files' pieces");
  }
}

}  // namespace

at::Tensor materialize(const at::Tensor& t) {
  if (!t.defined() || !t.is_meta()) return t;
  at::Tensor out = torch::empty(t.sizes(), torch::TensorOptions().dtype(lazy_of(t).type));  // [view's shape]
  read_part(t, out);
  return out;
}

void materialize_into(const at::Tensor& view, const at::Tensor& dest) {
  if (!view.is_meta()) {
    dest.copy_(view);
    return;
  }
  if (dest.device().is_cpu() && dest.is_contiguous() && dest.scalar_type() == view.scalar_type() &&
      dest.sizes() == view.sizes()) {
    read_part(view, dest);
  } else {
    dest.copy_(materialize(view));
  }
}

}  // namespace keel::checkpoint

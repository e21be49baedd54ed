// Why: everything needed to continue a run exactly, for one rank, as one value: fp32 master weights, every
// optimizer state tensor by name, the LR schedule, RNG states, the data ledger, the resolved config, the
// lineage and a section per plugin. The trainer fills it and restores from it; this file maps it to the
// HDF5 layout documented in docs/checkpoints.md (and back), and is the only torch-aware part of checkpointing.
#pragma once

#include <ATen/core/Tensor.h>
#include <keel/plugin.h>  // sdk::NamedTensors and sdk::PluginState, the one definition of each

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace keel::checkpoint {

using NamedTensors = sdk::NamedTensors;

// A loaded plugin's state as a checkpoint keeps it: what the plugin saved (sdk::PluginState: a JSON blob of
// scalars and its own tensors) and which plugin that is.
struct SavedPluginState : sdk::PluginState {
  std::string slot;
  std::string name;
  std::string version;

  SavedPluginState() = default;
  SavedPluginState(std::string slot_, std::string name_, std::string version_, std::string json_, NamedTensors tensors_)
      : sdk::PluginState{std::move(json_), std::move(tensors_)},
        slot(std::move(slot_)),
        name(std::move(name_)),
        version(std::move(version_)) {}
};

// Where a tensor of a rank file sits in the full tensor (tensor-parallel shards; see resharding.h).
struct Placement {
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offset;
};

struct TrainingState {
  int64_t step = 0;                  // optimizer steps completed
  int64_t tokens_seen = 0;           // tokens consumed by those steps
  NamedTensors model;                // fp32 master weights, model order
  std::string optimizer_name;        // the optimizer plugin's name ("adamw", "lion", ...)
  int64_t optimizer_step = 0;        // its step count ("step" of its JSON state), for readers
  std::string optimizer_json;        // the optimizer plugin's JSON state
  NamedTensors optimizer;            // "<param>/exp_avg", "<param>/exp_avg_sq", ...
  std::string lr_schedule;           // JSON: kind, lr, min_lr, warmup_steps, decay_steps (resolved)
  at::Tensor cpu_rng;                // uint8, the default CPU generator's state
  std::vector<at::Tensor> cuda_rng;  // uint8, one per CUDA device (empty on CPU-only builds or machines)
  std::string data_ledger;           // JSON: the data loader's state()
  std::string config_ini;            // the resolved config
  std::string lineage;               // JSON: see lineage.h
  std::vector<SavedPluginState> plugins;
  // Placement of the model and optimizer tensors, keyed "model/<param>" and "optimizer/<param>/<state>";
  // a tensor without an entry is whole (global shape = its shape, offset 0).
  std::map<std::string, Placement> placement;
};

struct RankInfo {
  int64_t rank = 0;
  int64_t world_size = 1;
};

// Writes `state` to a new HDF5 file at `path` (refuses to overwrite) and closes it.
void write_rank_file(const std::string& path, const TrainingState& state, RankInfo rank);
// Reads a file written by write_rank_file; tensors come back on the CPU. Throws CheckpointError naming the
// file and object for anything missing or malformed.
TrainingState read_rank_file(const std::string& path);
// Copies the current RNG states into `state` / restores them from it.
void capture_rng(TrainingState& state);
void restore_rng(const TrainingState& state);

}  // namespace keel::checkpoint

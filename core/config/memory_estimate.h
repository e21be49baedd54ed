// Why: an absurd model size (model.layers = 100000) used to be found only after the run dir was claimed, by an
// allocation failure or the OOM killer, or never (a model that took minutes to build). The bytes the weights,
// gradients and optimizer state need follow from the config alone, so `keel train` and `keel resume` compare
// them with the machine's memory before anything is written. Torch-free, like the rest of core/config: the
// parameter count mirrors core/model/llama.cpp layer by layer (tests/unit/test_config.cpp checks it against
// the real model).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config/config.h"

namespace keel {

// One parameter tensor as the model registers it, with how tensor parallelism splits it.
struct ParameterTensor {
  std::string name;                   // "blocks.0.attn.wq.weight"
  std::vector<int64_t> global_shape;  // the whole tensor
  int shard_dim = -1;                 // split over tp along this dim; -1 = replicated on every tp rank
  int64_t layer = -1;                 // block index; -1 = embedding / final norm / head
  double elements() const;
};

// Every parameter of the model, in the model's order (core/model/llama.cpp).
std::vector<ParameterTensor> parameter_tensors(const ModelConfig& model);

// Parameters of the whole model, exactly as core/model/llama.cpp builds it (a double: a config may describe
// more than 2^63 of them; it is exact below 2^53).
double count_parameters(const ModelConfig& model);

// The lower bound of the memory one training process needs, activations left out.
struct MemoryEstimate {
  double parameters = 0;           // whole model
  double rank_parameters = 0;      // the largest share one rank holds (TP shard of the largest pipeline stage)
  double bytes_per_parameter = 0;  // fp32 weight + fp32 gradient + optimizer state (+ bf16 copy), before ZeRO
  double rank_bytes = 0;           // one rank: rank_parameters x bytes, optimizer state / dp under ZeRO-1, RoPE tables
  std::string optimizer_assumption;  // which optimizer state was counted, e.g. "AdamW's 2 fp32 moments"
};
MemoryEstimate estimate_memory(const Config& config);

// The memory the ranks of this process's machine (or GPU) share, and how many ranks share it.
struct MemoryBudget {
  double bytes = 0;           // <= 0: unknown (nothing is refused)
  std::string what;           // "RAM (MemTotal in /proc/meminfo)", "GPU 0 memory (cuDeviceTotalMem)"
  int64_t ranks_sharing = 1;  // local ranks drawing on that memory
};
// RAM (MemTotal of /proc/meminfo) shared by LOCAL_WORLD_SIZE (or SLURM_NTASKS_PER_NODE) ranks; with
// train.device = cuda, the total memory of this rank's GPU (driver API, loaded with dlopen) shared by the local
// ranks mapped to it, or RAM when the driver cannot tell.
MemoryBudget machine_memory_budget(const Config& config);

// Throws ConfigError (one line: the estimate, the limit and the model.* keys) when ranks_sharing x rank_bytes
// exceeds budget.bytes.
void check_memory_fits(const Config& config, const MemoryBudget& budget);
// The same against this machine: called by `keel train` and `keel resume` right after the config is loaded.
void check_memory_fits(const Config& config);

}  // namespace keel

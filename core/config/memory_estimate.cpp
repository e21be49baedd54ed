// Why: see memory_estimate.h. The count follows core/model/llama.cpp: an embedding [V, C]; per block two norms,
// wq [H*D, C], wk and wv [K*D, C], wo [C, H*D], optional per-head q/k RMSNorms [D], SwiGLU w_gate and w_up
// [F, C] and w_down [C, F]; a final norm; a head [V, C] unless tied. Tensor parallelism shards every linear
// layer and the embedding over tp and replicates the norms; pipeline stages split the blocks evenly, the first
// stage adds the embedding, the last the final norm and head.
#include "core/config/memory_estimate.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace keel {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Counts {
  double embedding = 0;         // [V, C]
  double block_sharded = 0;     // one block's linear weights (split over tp)
  double block_replicated = 0;  // one block's norms (on every tp rank)
  double final_norm = 0;
  double head = 0;  // 0 when tied
};

Counts counts_of(const ModelConfig& m) {
  const double C = static_cast<double>(m.d_model), H = static_cast<double>(m.heads);
  const double K = static_cast<double>(m.kv_heads), D = static_cast<double>(m.head_dim());
  const double F = static_cast<double>(m.ffn_hidden), V = static_cast<double>(m.vocab);
  const double norm = m.norm == NormKind::kLayerNorm ? 2 * C : C;  // weight (+ bias)
  Counts c;
  c.embedding = V * C;
  c.block_sharded = C * H * D + 2 * C * K * D + H * D * C + 3 * C * F;
  c.block_replicated = 2 * norm + (m.qk_norm ? 2 * D : 0);  // q_norm/k_norm are RMSNorms: weight only
  c.final_norm = norm;
  c.head = m.tie_embeddings ? 0 : V * C;
  return c;
}

std::string gib(double bytes) {
  char text[64];
  const double n = bytes / kGiB;
  std::snprintf(text, sizeof(text), n < 1e6 ? "%.1f GiB" : "%.3g GiB", n);
  return text;
}

std::string count_text(double n) {
  char text[64];
  if (n >= 1e12)
    std::snprintf(text, sizeof(text), "%.3g", n);
  else if (n >= 1e9)
    std::snprintf(text, sizeof(text), "%.2fB", n / 1e9);
  else if (n >= 1e6)
    std::snprintf(text, sizeof(text), "%.2fM", n / 1e6);
  else
    std::snprintf(text, sizeof(text), "%.0f", n);
  return text;
}

// A positive integer from the environment (leading digits: SLURM_NTASKS_PER_NODE may read "4(x2)"), else 0.
int64_t env_count(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return 0;
  char* end = nullptr;
  const long long n = std::strtoll(value, &end, 10);
  return end != value && n > 0 ? n : 0;
}

int64_t env_index(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return -1;
  char* end = nullptr;
  const long long n = std::strtoll(value, &end, 10);
  return end != value && n >= 0 ? n : -1;
}

double mem_total_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemTotal:", 0) != 0) continue;
    std::istringstream fields(line.substr(9));
    double kib = 0;
    if (fields >> kib) return kib * 1024.0;
  }
  return 0;
}

// Total memory of CUDA device `ordinal` through the driver API (libcuda.so.1, loaded at run time so that the
// config library stays free of CUDA and LibTorch); 0 when there is no driver or it cannot tell. Sets `count`.
double cuda_device_bytes(int64_t ordinal, int& count) {
  count = 0;
  void* cuda = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (cuda == nullptr) return 0;
  using InitFn = int (*)(unsigned int);
  using CountFn = int (*)(int*);
  using GetFn = int (*)(int*, int);
  using TotalFn = int (*)(size_t*, int);
  auto init = reinterpret_cast<InitFn>(::dlsym(cuda, "cuInit"));
  auto device_count = reinterpret_cast<CountFn>(::dlsym(cuda, "cuDeviceGetCount"));
  auto get = reinterpret_cast<GetFn>(::dlsym(cuda, "cuDeviceGet"));
  auto total = reinterpret_cast<TotalFn>(::dlsym(cuda, "cuDeviceTotalMem_v2"));
  // The library stays loaded: LibTorch loads the same driver moments later.
  if (!init || !device_count || !get || !total || init(0) != 0 || device_count(&count) != 0 || count <= 0) return 0;
  int device = 0;
  size_t bytes = 0;
  if (get(&device, static_cast<int>(ordinal % count)) != 0 || total(&bytes, device) != 0) return 0;
  return static_cast<double>(bytes);
}

}  // namespace

double count_parameters(const ModelConfig& model) {
  const Counts c = counts_of(model);
  return c.embedding + static_cast<double>(model.layers) * (c.block_sharded + c.block_replicated) + c.final_norm +
         c.head;
}

MemoryEstimate estimate_memory(const Config& config) {
  const ModelConfig& m = config.model;
  const ParallelConfig& par = config.parallel;
  const Counts c = counts_of(m);
  const double tp = static_cast<double>(par.tp);
  const double stage_blocks = static_cast<double>(m.layers) / static_cast<double>(par.pp);
  const double blocks = stage_blocks * (c.block_sharded / tp + c.block_replicated);
  const double first = c.embedding / tp, last = c.final_norm + c.head / tp;
  MemoryEstimate e;
  e.parameters = count_parameters(m);
  e.rank_parameters = blocks + (par.pp == 1 ? first + last : std::max(first, last));
  // Optimizer state: the built-in Lion keeps one fp32 moment; AdamW and any other optimizer are counted with
  // AdamW's two (a plugin's own state is unknown here).
  const bool lion = config.plugins.optimizer == "lion";
  const double optimizer_bytes = lion ? 4.0 : 8.0;
  e.optimizer_assumption = lion ? "Lion's fp32 moment" : "AdamW's 2 fp32 moments";
  const double bf16_copy = config.train.precision == Precision::kBf16Mixed ? 2.0 : 0.0;
  e.bytes_per_parameter = 4.0 + 4.0 + optimizer_bytes + bf16_copy;
  const double optimizer_share = par.zero == 1 ? 1.0 / static_cast<double>(par.dp) : 1.0;
  // RoPE cos/sin tables, fp32 [seq_len, rotary_dims / 2] each, built once per model (stage).
  const double rotary_dims = std::floor(static_cast<double>(m.head_dim()) * m.rotary_fraction / 2.0) * 2.0;
  const double rope = 2.0 * static_cast<double>(m.seq_len) * (rotary_dims / 2.0) * 4.0;
  e.rank_bytes = e.rank_parameters * (4.0 + 4.0 + bf16_copy + optimizer_bytes * optimizer_share) + rope;
  return e;
}

MemoryBudget machine_memory_budget(const Config& config) {
  MemoryBudget budget;
  int64_t local_ranks = env_count("LOCAL_WORLD_SIZE");
  if (local_ranks == 0) local_ranks = env_count("SLURM_NTASKS_PER_NODE");
  if (local_ranks == 0) local_ranks = 1;
  if (config.train.device == Device::kCuda) {
    int64_t local_rank = env_index("LOCAL_RANK");
    if (local_rank < 0) local_rank = env_index("SLURM_LOCALID");
    if (local_rank < 0) local_rank = 0;
    int devices = 0;
    const double bytes = cuda_device_bytes(local_rank, devices);
    if (bytes > 0) {
      // The trainer puts local rank r on device r % devices: count the local ranks that share this one.
      const int64_t mine = local_rank % devices;
      budget.bytes = bytes;
      budget.what = "memory of GPU " + std::to_string(mine);
      budget.ranks_sharing = local_ranks / devices + (mine < local_ranks % devices ? 1 : 0);
      if (budget.ranks_sharing < 1) budget.ranks_sharing = 1;
      return budget;
    }
  }
  budget.bytes = mem_total_bytes();
  budget.what = config.train.device == Device::kCuda ? "RAM (MemTotal in /proc/meminfo; the GPU's memory is unknown)"
                                                     : "RAM (MemTotal in /proc/meminfo)";
  budget.ranks_sharing = local_ranks;
  return budget;
}

void check_memory_fits(const Config& config, const MemoryBudget& budget) {
  if (budget.bytes <= 0) return;
  const MemoryEstimate e = estimate_memory(config);
  const double needed = e.rank_bytes * static_cast<double>(budget.ranks_sharing);
  if (needed <= budget.bytes) return;
  const ModelConfig& m = config.model;
  const ParallelConfig& par = config.parallel;
  std::ostringstream out;
  out << (config.source_file.empty() ? std::string("config") : config.source_file) << ": model.layers=" << m.layers
      << " model.d_model=" << m.d_model << " model.heads=" << m.heads << " model.kv_heads=" << m.kv_heads
      << " model.ffn_hidden=" << m.ffn_hidden << " model.vocab=" << m.vocab << " model.seq_len=" << m.seq_len
      << " make " << count_text(e.parameters) << " parameters, an estimated " << gib(needed) << " before activations ("
      << e.bytes_per_parameter << " bytes per parameter: fp32 weights, fp32 gradients, " << e.optimizer_assumption
      << (config.train.precision == Precision::kBf16Mixed ? ", bf16 copy" : "");
  if (par.tp * par.pp > 1) out << "; split over parallel.tp x parallel.pp = " << par.tp * par.pp;
  if (par.zero == 1 && par.dp > 1) out << "; optimizer state / parallel.dp = " << par.dp;
  out << "; " << budget.ranks_sharing << (budget.ranks_sharing == 1 ? " rank" : " ranks") << " x " << gib(e.rank_bytes)
      << "), more than the " << gib(budget.bytes) << " of " << budget.what << ": reduce the model.* sizes";
  throw ConfigError(out.str());
}

void check_memory_fits(const Config& config) { check_memory_fits(config, machine_memory_budget(config)); }

}  // namespace keel

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

double ParameterTensor::elements() const {
  double n = 1;
  for (int64_t d : global_shape) n *= static_cast<double>(d);
  return n;
}

std::vector<ParameterTensor> parameter_tensors(const ModelConfig& m) {
  const int64_t C = m.d_model, D = m.head_dim();
  std::vector<ParameterTensor> out;
  auto norm = [&](const std::string& prefix, int64_t dim, int64_t layer, bool layernorm) {
    out.push_back({prefix + ".weight", {dim}, -1, layer});
    if (layernorm) out.push_back({prefix + ".bias", {dim}, -1, layer});
  };
  const bool layernorm = m.norm == NormKind::kLayerNorm;
  out.push_back({"embed.weight", {m.vocab, C}, 0, -1});
  for (int64_t layer = 0; layer < m.layers; ++layer) {
    const std::string b = "blocks." + std::to_string(layer);
    norm(b + ".attn_norm", C, layer, layernorm);
    out.push_back({b + ".attn.wq.weight", {m.heads * D, C}, 0, layer});
    out.push_back({b + ".attn.wk.weight", {m.kv_heads * D, C}, 0, layer});
    out.push_back({b + ".attn.wv.weight", {m.kv_heads * D, C}, 0, layer});
    out.push_back({b + ".attn.wo.weight", {C, m.heads * D}, 1, layer});
    if (m.qk_norm) {  // per-head RMSNorms: weight only
      out.push_back({b + ".attn.q_norm.weight", {D}, -1, layer});
      out.push_back({b + ".attn.k_norm.weight", {D}, -1, layer});
    }
    norm(b + ".mlp_norm", C, layer, layernorm);
    out.push_back({b + ".mlp.w_gate.weight", {m.ffn_hidden, C}, 0, layer});
    out.push_back({b + ".mlp.w_up.weight", {m.ffn_hidden, C}, 0, layer});
    out.push_back({b + ".mlp.w_down.weight", {C, m.ffn_hidden}, 1, layer});
  }
  norm("final_norm", C, -1, layernorm);
  if (!m.tie_embeddings) out.push_back({"head.weight", {m.vocab, C}, 0, -1});
  return out;
}

namespace {
// One rank's share of the parameters, from the tensors of a one-block model (so that an absurd model.layers costs
// nothing to count): one block (TP shards + replicated norms), the embedding, and the final norm + head.
struct Shares {
  double block = 0, embedding = 0, final_and_head = 0;
};
Shares shares_of(const ModelConfig& model, int64_t tp) {
  ModelConfig one = model;
  one.layers = 1;
  Shares s;
  for (const ParameterTensor& t : parameter_tensors(one)) {
    const double share = t.shard_dim >= 0 ? t.elements() / static_cast<double>(tp) : t.elements();
    (t.layer >= 0 ? s.block : t.name == "embed.weight" ? s.embedding : s.final_and_head) += share;
  }
  return s;
}
}  // namespace

double count_parameters(const ModelConfig& model) {
  const Shares s = shares_of(model, 1);
  return s.embedding + static_cast<double>(model.layers) * s.block + s.final_and_head;
}

MemoryEstimate estimate_memory(const Config& config) {
  const ModelConfig& m = config.model;
  const ParallelConfig& par = config.parallel;
  const Shares s = shares_of(m, par.tp);
  const double blocks = static_cast<double>(m.layers) / static_cast<double>(par.pp) * s.block;
  MemoryEstimate e;
  e.parameters = count_parameters(m);
  e.rank_parameters = blocks + (par.pp == 1 ? s.embedding + s.final_and_head : std::max(s.embedding, s.final_and_head));
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

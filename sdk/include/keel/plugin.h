// Why: the one header a Keel plugin includes. A plugin is a shared library that exports one C function,
// `keel_plugin_info()`, returning a plain struct (the handshake, after LLVM's PassPluginLibraryInfo and ggml's
// backend registration): API version first, then the struct's size, the build fingerprint, name, version, the
// slots it fills and two factory functions. Keel checks version, size and fingerprint before it touches any C++
// type from the library, and refuses a mismatch with both sides printed. The plugin object itself is a C++
// class deriving from keel::sdk::Plugin; it sees the training step through StepContext and acts through the
// virtual functions of the slot it fills. See docs/plugins.md for the guide and the hook order.
//
// The smallest plugin:
//   #include <keel/plugin.h>
//   class Hello : public keel::sdk::Plugin {
//    public:
//     explicit Hello(const keel::sdk::Args&) {}
//     void on_step_end(const keel::sdk::StepContext& ctx) override { ctx.metric("loss_x2", 2 * ctx.loss); }
//   };
//   KEEL_PLUGIN(Hello, "hello", "1.0", keel::sdk::kObserver, "doubles the loss, as a metric")
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/version.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace keel::sdk {

// Bumped whenever PluginInfo, Plugin, StepContext or Decision change in a way an old plugin would misread.
// 2: StepContext gained `kernels` (the host's fused optimizer kernels), which moved the members after it.
inline constexpr uint32_t kApiVersion = 2;
#define KEEL_SDK_VERSION "0.1.0"

// ------------------------------------------------------------------------------------------------ handshake

// What both sides were compiled with. C++ objects cross the library boundary, so all four must match.
struct BuildFingerprint {
  char sdk_version[16];
  char torch_version[24];
  int32_t cxx11_abi;  // _GLIBCXX_USE_CXX11_ABI
  char compiler[96];
};

// Evaluated in the translation unit that calls it: the plugin gets its own build's values, Keel gets Keel's.
inline BuildFingerprint build_fingerprint() {
  BuildFingerprint f{};
  std::snprintf(f.sdk_version, sizeof(f.sdk_version), "%s", KEEL_SDK_VERSION);
  std::snprintf(f.torch_version, sizeof(f.torch_version), "%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                TORCH_VERSION_PATCH);
#ifdef _GLIBCXX_USE_CXX11_ABI
  f.cxx11_abi = _GLIBCXX_USE_CXX11_ABI;
#else
  f.cxx11_abi = -1;
#endif
#if defined(__clang__)
  std::snprintf(f.compiler, sizeof(f.compiler), "clang %d", __clang_major__);
#elif defined(__GNUC__)
  std::snprintf(f.compiler, sizeof(f.compiler), "gcc %d", __GNUC__);
#else
  std::snprintf(f.compiler, sizeof(f.compiler), "unknown");
#endif
  return f;
}

// The slots a plugin can fill (a bit set in PluginInfo::slots). docs/plugins.md lists what each may change.
enum Slot : uint32_t {
  kOptimizer = 1u << 0,      // updates the fp32 master weights from their gradients
  kLrSchedule = 1u << 1,     // the learning rate of each step
  kSpikeHandler = 1u << 2,   // the step decision: continue, skip the update, roll back, stop
  kGradTransform = 1u << 3,  // changes gradients after clipping (a chain: several may be loaded)
  kDataMixture = 1u << 4,    // mixing ratios of the data sources per step
  kObserver = 1u << 5,       // reads every step; adds metrics and events (several may be loaded)
};

// --plugin-arg NAME.key=value and [plugin.NAME] config entries, keyed without the "NAME." prefix. The resolved
// run config is included too, under its own keys ("optim.beta1", "train.steps", ...).
using Args = std::map<std::string, std::string>;

// Typed access to Args; a missing key gives `fallback`, a malformed value throws std::invalid_argument naming
// the key (Keel reports it and refuses to load the plugin).
inline double arg_double(const Args& args, const std::string& key, double fallback) {
  const auto it = args.find(key);
  if (it == args.end()) return fallback;
  try {
    size_t used = 0;
    const double v = std::stod(it->second, &used);
    if (used == it->second.size()) return v;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument("plugin argument '" + key + "' = '" + it->second + "' is not a number");
}
inline int64_t arg_int(const Args& args, const std::string& key, int64_t fallback) {
  const auto it = args.find(key);
  if (it == args.end()) return fallback;
  try {
    size_t used = 0;
    const long long v = std::stoll(it->second, &used);
    if (used == it->second.size()) return v;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument("plugin argument '" + key + "' = '" + it->second + "' is not an integer");
}
inline bool arg_bool(const Args& args, const std::string& key, bool fallback) {
  const auto it = args.find(key);
  if (it == args.end()) return fallback;
  if (it->second == "true" || it->second == "1") return true;
  if (it->second == "false" || it->second == "0") return false;
  throw std::invalid_argument("plugin argument '" + key + "' = '" + it->second + "' is not true/false");
}
inline std::string arg_string(const Args& args, const std::string& key, const std::string& fallback) {
  const auto it = args.find(key);
  return it == args.end() ? fallback : it->second;
}

// Refuses plugin-specific keys (those without a '.') that are not in `known`, so that a typo in
// --plugin-arg NAME.key=value is an error naming the key, not a silently ignored setting.
inline void require_known_args(const Args& args, std::initializer_list<const char*> known) {
  for (const auto& [key, value] : args) {
    if (key.find('.') != std::string::npos) continue;  // a run config key, not a plugin argument
    bool ok = false;
    for (const char* k : known) ok = ok || key == k;
    if (!ok) {
      std::string list;
      for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      throw std::invalid_argument("unknown plugin argument '" + key + "' (known: " + (list.empty() ? "none" : list) +
                                  ")");
    }
  }
}

// ------------------------------------------------------------------------------------------------ the step

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// One fp32 master weight. `param.grad()` is its fp32 gradient (already reduced across data-parallel ranks and
// clipped when a grad_transform or the optimizer sees it). Names: "embed.weight", "blocks.0.attn.wq.weight", ...
struct Param {
  std::string name;
  at::Tensor param;
  bool decay = true;  // weight decay applies (matrices); false for norm weights
};

// One sample of the global batch: where it comes from in the data order (docs/data.md).
struct SampleInfo {
  std::string source;
  int64_t sample_id = 0;  // unpermuted sample id within the source
  int64_t epoch = 0;
  int64_t chunk = 0;
};

// Fused kernels the host lends to optimizer plugins (StepContext::kernels), so that a plugin built against the SDK
// alone updates all its tensors in one CUDA launch instead of a few LibTorch ops per tensor. Each function takes
// parallel lists of fp32 tensors, one entry per updated param (params, their gradients and the optimizer's moments,
// in place), with decay[i] saying whether param i is weight-decayed, and does exactly the arithmetic of the
// built-in plugin's own loop (plugins/adamw, plugins/lion) on CPU. A plugin calls them for CUDA params and keeps
// its own loop for everything else. Bad input (lists of different lengths, mismatched shapes, not fp32) throws
// a std::exception naming the argument.
struct AdamWHyper {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based count of updates so far, including this one (bias correction)
};
struct LionHyper {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.99, weight_decay = 0.0;
};
struct HostKernels {
  void (*adamw_step)(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<bool>& decay, const AdamWHyper& hyper) = nullptr;
  void (*lion_step)(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<bool>& decay,
                    const LionHyper& hyper) = nullptr;
};

// What a plugin sees of the step. Filled stage by stage (docs/plugins.md says which fields are valid at which
// hook); read-only except through the two output channels.
struct StepContext {
  int64_t step = 0;           // 0-based index of this optimizer step
  int64_t total_steps = 0;    // train.steps
  int64_t tokens_before = 0;  // tokens consumed by earlier steps
  int64_t tokens = 0;         // tokens in this step's global batch
  double base_lr = 0.0;       // the configured schedule's LR for this step (before the lr_schedule slot)
  double lr = 0.0;            // the LR the optimizer will use
  double loss = 0.0;          // mean token NLL of the global batch (fp32)
  double z_loss = 0.0;
  double grad_norm = 0.0;                 // global L2 norm of the gradients before clipping
  double clip_factor = 1.0;               // factor clipping applied
  std::vector<std::string> tensor_names;  // model order
  std::vector<float> tensor_grad_norms;   // per tensor, before clipping (empty if metrics.per_tensor = false)
  std::vector<SampleInfo> batch;          // the samples of the global batch, in order
  // Layout of this process (all 1/0 in a single-process run).
  int64_t rank = 0, world_size = 1, dp_rank = 0, dp_size = 1, tp_rank = 0, tp_size = 1, pp_rank = 0, pp_size = 1;
  // The host's fused kernels, or nullptr (a host without them, or a test): optimizers then run their own loop.
  const HostKernels* kernels = nullptr;

  // Output channels: a scalar for this step in metrics.h5 (/train/extra/<plugin>.<name>) and an event.
  std::function<void(const std::string& name, double value)> metric = [](const std::string&, double) {};
  std::function<void(const std::string& kind, const std::string& text)> event = [](const std::string&,
                                                                                   const std::string&) {};
};

// The spike_handler's answer. kRollback: Keel reloads the newest checkpoint at or before this step, applies the
// intervention below from that step on, and trains forward again (the replayed steps appear again in metrics).
struct Decision {
  enum class Action { kContinue, kSkipUpdate, kRollback, kStop };
  Action action = Action::kContinue;
  std::string reason;
  // kRollback only: the intervention applied from the checkpoint's step on.
  std::string skip_data;  // skip rules, e.g. "prose:chunk:3;code:samples:100-163" (docs/data.md)
  bool reset_optimizer_moments = false;
  // Any action: multiply the LR by lr_factor for lr_factor_steps steps, counted from this step (kContinue,
  // kSkipUpdate) or from the checkpoint's step (kRollback). 1.0 / 0 (the defaults) ask for nothing new; they do
  // not cancel a factor already in force.
  double lr_factor = 1.0;
  int64_t lr_factor_steps = 0;

  static Decision skip_update(std::string why) {
    Decision d;
    d.action = Action::kSkipUpdate;
    d.reason = std::move(why);
    return d;
  }
  static Decision stop(std::string why) {
    Decision d;
    d.action = Action::kStop;
    d.reason = std::move(why);
    return d;
  }
};

// A plugin's own state, saved in every checkpoint under its slot and name, and given back on resume.
struct PluginState {
  std::string json;  // scalars and small lists, as JSON text ("" = none)
  NamedTensors tensors;
};

// Small helpers for PluginState. JSON here is a flat object of numbers, e.g. {"step": 12, "mean": 2.5};
// keep lists and arrays in `tensors`.
inline double json_double(const std::string& json, const std::string& key, double fallback) {
  const std::string quoted = "\"" + key + "\"";
  const size_t at = json.find(quoted);
  if (at == std::string::npos) return fallback;
  const size_t colon = json.find(':', at + quoted.size());
  if (colon == std::string::npos) return fallback;
  char* end = nullptr;
  const double v = std::strtod(json.c_str() + colon + 1, &end);
  return end == json.c_str() + colon + 1 ? fallback : v;
}
inline int64_t json_int(const std::string& json, const std::string& key, int64_t fallback) {
  return static_cast<int64_t>(json_double(json, key, static_cast<double>(fallback)));
}
// The tensor called `name` with the shape of `like`, or nullptr.
inline const at::Tensor* find_tensor(const NamedTensors& tensors, const std::string& name, const at::Tensor& like) {
  for (const auto& [n, t] : tensors) {
    if (n == name && t.sizes() == like.sizes()) return &t;
  }
  return nullptr;
}
// The same, but a missing or misshapen tensor throws std::runtime_error naming it.
inline const at::Tensor& tensor_named(const NamedTensors& tensors, const std::string& name, const at::Tensor& like) {
  const at::Tensor* t = find_tensor(tensors, name, like);
  if (t == nullptr) throw std::runtime_error("plugin state has no tensor '" + name + "' of the expected shape");
  return *t;
}

// ------------------------------------------------------------------------------------------------ the plugin

// Override what the slot you fill needs; everything has a harmless default. Keel calls a plugin from one
// thread. Exceptions thrown from a hook stop the run with the plugin named.
class Plugin {
 public:
  virtual ~Plugin() = default;

  // Every slot.
  virtual PluginState save_state() const { return {}; }
  virtual void load_state(const PluginState& /*state*/) {}
  virtual void on_step_end(const StepContext& /*ctx*/) {}  // after the update; observers live here

  // optimizer: bind() once (before load_state or adopt_state), then step() each step that is not skipped.
  virtual void bind(std::vector<Param> /*params*/) {}
  virtual void step(const StepContext& /*ctx*/) {}
  // Swapping optimizers at a checkpoint: state of the previous optimizer ("<param>/exp_avg", ...). Return one
  // line per tensor kind adopted or freshly initialised; Keel logs them and records them in the lineage.
  virtual std::vector<std::string> adopt_state(const NamedTensors& /*previous*/) { return {}; }
  // Reset moments (a rollback intervention).
  virtual void reset_moments() {}

  // lr_schedule: the LR of ctx.step, given the configured warm-up + cosine value `base_lr`.
  virtual double learning_rate(const StepContext& /*ctx*/, double base_lr) { return base_lr; }

  // spike_handler: called after gradients are reduced and clipped, before the update.
  virtual Decision decide(const StepContext& /*ctx*/) { return {}; }
  // After Keel rolled back to `to_step` because of this plugin's decision (plugin state is not rolled back).
  virtual void on_rollback(int64_t /*to_step*/) {}

  // grad_transform: change param.grad() in place (after clipping, before the spike decision).
  virtual void transform_grads(const StepContext& /*ctx*/, std::vector<Param>& /*params*/) {}

  // data_mixture: the weights from `step` on, e.g. "prose=0.3,code=0.7", or "" for no change. Called at every
  // step boundary; Keel applies a change from that step on and records it in the data ledger.
  virtual std::string mixture_at(int64_t /*step*/, const std::vector<std::string>& /*sources*/) { return ""; }
};

// ------------------------------------------------------------------------------------------------ warm start

// An optional entry point, outside the handshake: a plugin that starts without saved state on a resumed or
// branched run (or one swapped in mid-run) can be handed the run's recent history instead of starting blind.
// A plugin opts in with KEEL_PLUGIN_WARM_START(CLASS) next to KEEL_PLUGIN(...) and a non-virtual member
//   keel::sdk::WarmStartResult warm_start(const keel::sdk::WarmStartHistory& history);
// The macro exports `keel_plugin_warm_start`; Keel looks it up only after the handshake has passed and calls it
// once, after load_state would have been called, before the plugin's first step. A library without it (every
// plugin built before this hook) loads as before: adding the hook did not change kApiVersion, PluginInfo or the
// Plugin class. Both structs start with their size, which the macro checks before reading anything else.

// One optimizer step as the run's metrics.h5 recorded it (the last row of that step: after a rollback, the
// replayed one).
struct HistoryRow {
  int64_t step = 0;
  double loss = 0.0;       // ctx.loss of that step
  double grad_norm = 0.0;  // ctx.grad_norm of that step (before clipping)
  bool skipped = false;    // its update was not applied (a spike handler's skip, a non-finite loss, ...)
};

// At most this many rows are handed over (the newest ones).
inline constexpr int64_t kWarmStartMaxRows = 1000;

struct WarmStartHistory {
  uint32_t struct_size = sizeof(WarmStartHistory);
  int64_t start_step = 0;        // the first step the plugin will see
  std::vector<HistoryRow> rows;  // oldest first, steps < start_step, one per step; empty when none was found
  std::string source;            // where the rows come from, for messages ("runs/base/metrics.h5 steps 0-12")
};

struct WarmStartResult {
  uint32_t struct_size = sizeof(WarmStartResult);
  int64_t rows_used = 0;       // rows that went into the plugin's state
  int64_t inactive_steps = 0;  // steps from start_step on during which the plugin cannot act yet (0: ready)
};

// Returns 0, or non-zero with a message in `error` (Keel then stops the run naming the plugin).
using WarmStartFn = int (*)(Plugin* plugin, const WarmStartHistory* history, WarmStartResult* result, char* error,
                            size_t error_size);

using CreateFn = Plugin* (*)(const Args* args, char* error, size_t error_size);
using DestroyFn = void (*)(Plugin* plugin);

// Returned by keel_plugin_info(). Plain data: Keel reads api_version and struct_size before anything else.
struct PluginInfo {
  uint32_t api_version;
  uint32_t struct_size;
  BuildFingerprint fingerprint;
  const char* name;
  const char* version;
  const char* description;
  uint32_t slots;
  CreateFn create;
  DestroyFn destroy;
};

}  // namespace keel::sdk

// Exports the handshake for CLASS (constructible from `const keel::sdk::Args&`). NAME is what users type after
// --plugin SLOT=; SLOTS is a bit set of keel::sdk::Slot.
#define KEEL_PLUGIN(CLASS, NAME, VERSION, SLOTS, DESCRIPTION)                                           \
  extern "C" __attribute__((visibility("default"))) const ::keel::sdk::PluginInfo* keel_plugin_info() { \
    static const ::keel::sdk::PluginInfo info = {                                                       \
        ::keel::sdk::kApiVersion,                                                                       \
        static_cast<uint32_t>(sizeof(::keel::sdk::PluginInfo)),                                         \
        ::keel::sdk::build_fingerprint(),                                                               \
        NAME,                                                                                           \
        VERSION,                                                                                        \
        DESCRIPTION,                                                                                    \
        static_cast<uint32_t>(SLOTS),                                                                   \
        [](const ::keel::sdk::Args* args, char* error, size_t error_size) -> ::keel::sdk::Plugin* {     \
          try {                                                                                         \
            return new CLASS(*args);                                                                    \
          } catch (const std::exception& e) {                                                           \
            std::snprintf(error, error_size, "%s", e.what());                                           \
            return nullptr;                                                                             \
          }                                                                                             \
        },                                                                                              \
        [](::keel::sdk::Plugin* plugin) { delete plugin; }};                                            \
    return &info;                                                                                       \
  }

// Exports the optional warm-start entry point for CLASS (the class of this library's KEEL_PLUGIN), which has a
// member `keel::sdk::WarmStartResult warm_start(const keel::sdk::WarmStartHistory&)`. See "warm start" above.
#define KEEL_PLUGIN_WARM_START(CLASS)                                                                                  \
  extern "C" __attribute__((visibility("default"))) int keel_plugin_warm_start(                                        \
      ::keel::sdk::Plugin* plugin, const ::keel::sdk::WarmStartHistory* history, ::keel::sdk::WarmStartResult* result, \
      char* error, size_t error_size) {                                                                                \
    if (history == nullptr || result == nullptr || history->struct_size != sizeof(::keel::sdk::WarmStartHistory) ||    \
        result->struct_size != sizeof(::keel::sdk::WarmStartResult)) {                                                 \
      std::snprintf(error, error_size, "%s",                                                                           \
                    "warm-start structs of another size: rebuild the plugin against this SDK");                        \
      return 1;                                                                                                        \
    }                                                                                                                  \
    try {                                                                                                              \
      *result = static_cast<CLASS*>(plugin)->warm_start(*history);                                                     \
      result->struct_size = static_cast<uint32_t>(sizeof(::keel::sdk::WarmStartResult));                               \
      return 0;                                                                                                        \
    } catch (const std::exception& e) {                                                                                \
      std::snprintf(error, error_size, "%s", e.what());                                                                \
      return 1;                                                                                                        \
    }                                                                                                                  \
  }

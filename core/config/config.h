// Why: one typed, validated view of a run's configuration. Every key a user can set lives in the key table of
// config.cpp (name, type, default, doc), so INI files, `--set key=value` overrides, the resolved config written
// into run dirs and metrics attributes, and error messages all come from the same place. No LibTorch here:
// this header is included widely.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace keel {

// Thrown for any bad user configuration; the message names the file (and line) and the key.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Settings with a fixed set of values are enums once parsed. Config files, `--set`, `keel config show` and every
// config.ini Keel writes spell them as the strings in the comments (name_of; parsing is in config.cpp's key table).
enum class Device { kCpu, kCuda };                  // "cpu" | "cuda"
enum class Precision { kFp32, kBf16Mixed };         // "fp32" | "bf16-mixed"
enum class NormKind { kRmsNorm, kLayerNorm };       // "rmsnorm" | "layernorm"
enum class PipelineSchedule { kOneFOneB, kGPipe };  // "1f1b" | "gpipe"
enum class Recompute { kNone, kFull, kSelective };  // "none" | "full" | "selective"
enum class Parametrization { kStandard, kMup };     // "standard" | "mup"
std::string name_of(Device device);
std::string name_of(Precision precision);
std::string name_of(NormKind norm);
std::string name_of(PipelineSchedule schedule);
std::string name_of(Recompute recompute);
std::string name_of(Parametrization parametrization);

struct ModelConfig {
  int64_t layers = 2;
  int64_t d_model = 64;
  int64_t heads = 4;
  int64_t kv_heads = 4;      // < heads: grouped-query attention
  int64_t ffn_hidden = 176;  // SwiGLU hidden size
  int64_t vocab = 2048;
  int64_t seq_len = 64;
  NormKind norm = NormKind::kRmsNorm;
  double norm_eps = 1e-5;
  double rotary_fraction = 1.0;  // share of each head's dims that get RoPE (CrystalCoder: 0.25)
  double rope_theta = 10000.0;
  bool tie_embeddings = false;
  bool qk_norm = false;
  double z_loss = 0.0;  // coefficient of the z-loss term (log Z)^2; 0 disables it
  double init_std = 0.02;
  Recompute recompute = Recompute::kNone;  // activations recomputed in backward, per block
  // mup: μP (maximal update parametrization): init, per-layer LR and output logits scaled by the width ratio
  // mup_base_d_model / d_model, so hyperparameters tuned at the base width carry over (docs/parallel.md).
  Parametrization parametrization = Parametrization::kStandard;
  int64_t mup_base_d_model = 0;  // the width the hyperparameters were tuned at; 0 = d_model (ratio 1)
  int64_t head_dim() const { return d_model / heads; }
};

struct TrainConfig {
  int64_t steps = 100;      // total number of optimizer steps of the run
  int64_t micro_batch = 4;  // sequences per micro-batch (single process; see ParallelConfig::microbatches)
  int64_t grad_accum = 1;   // micro-batches per step
  uint64_t seed = 1234;     // model init and everything random except the data order
  Precision precision = Precision::kBf16Mixed;
  int64_t log_every = 10;  // console progress line every N steps
  Device device = Device::kCpu;
  int64_t threads = 0;         // intra-op threads; 0 = all CPUs
  std::string batch_schedule;  // global batch by step, "STEP:BATCH;..." (batch-size warm-up); "" = constant
};

struct OptimConfig {
  double lr = 3e-4;
  double min_lr = 3e-5;  // cosine floor
  int64_t warmup_steps = 2000;
  int64_t decay_steps = 0;  // length of warmup + cosine; 0 = train.steps
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // global-norm clip; 0 disables it
};

// One named corpus source: raw inputs and how to split them into documents.
struct SourceConfig {
  std::string name;
  std::vector<std::string> inputs;  // files, directories (recursed) or globs
  std::string include = "*";        // filename glob applied inside directories, e.g. "*.py"
  std::string split = "file";       // file (one document per file) | fortune (documents separated by '%' lines)
  double max_mb = 0.0;              // stop reading raw text after this many MiB; 0 = no limit
  // text (raw text, tokenized by Keel) | megatron (PREFIX.bin + .idx) | npy (.npy or raw arrays, EOS-separated)
  // | jsonl-tokens (JSON lines with "token_ids", .gz allowed; parsed once into a shard cache).
  // Pre-tokenized formats are read in place (docs/data.md); written to config.ini only when not "text".
  std::string format = "text";
  std::string dtype;      // raw (non-.npy) token arrays of format npy: uint16 | uint32; "" = .npy files only
  double heldout = -1.0;  // held-out documents: >= 1 a count, in (0, 1) a fraction, 0 none, -1 the default share
};

struct DataConfig {
  std::string dir = "data/bundled";  // prepared tokenizer + shards go here; absolute after load_config
  std::vector<SourceConfig> sources;
  uint64_t seed = 42;               // data order seed (permutations, source picks)
  std::string mixture;              // "prose=0.7,code=0.3"; empty = proportional to source size
  std::string schedule;             // stages "0:prose=0.7,code=0.3;500:prose=0.3,code=0.7"; overrides mixture
  std::string skip;                 // skip list "prose:chunk:3;code:samples:100-200"
  int64_t chunks = 360;             // chunks per source epoch (LLM360 Amber: 360)
  int64_t tokenizer_sample_mb = 4;  // raw text used to train the tokenizer
  int64_t eos_id = -1;              // separator id of pre-tokenized sources; -1 = unset (not in config.ini)
  std::string tokenizer;            // an existing SentencePiece model to use; "" = train one from the sources
  bool add_bos = false;             // prepend the tokenizer's BOS id to every document
};

struct MetricsConfig {
  int64_t flush_every = 10;  // metrics.h5 is closed and consistent after every flush
  bool per_tensor = true;    // per-parameter grad/param norm matrices
  int64_t stats_every = 0;   // instability precursors (activation, logit, update and moment statistics); 0 = off
};

struct CheckpointConfig {
  int64_t every = 0;            // save every N steps; 0 = no periodic checkpoints
  bool at_end = true;           // save after the last step (a stop signal always saves)
  int64_t keep_last = 3;        // newest complete checkpoints kept (>= 2); 0 = keep all
  int64_t milestone_every = 0;  // steps divisible by M are kept forever (LLM360 kept 360); 0 = none
  bool async = false;           // write, hash and commit on a background thread while training continues
};

// The 3D layout (docs/parallel.md). dp x tp x pp must equal the number of ranks the job was started with.
struct ParallelConfig {
  int64_t dp = 1;            // data-parallel replicas; each reads a disjoint slice of the global batch
  int64_t tp = 1;            // tensor-parallel ranks (heads, FFN and vocabulary split Megatron-style)
  int64_t pp = 1;            // pipeline stages (model.layers split evenly)
  int64_t microbatches = 0;  // micro-batches per DP rank and step; 0 = train.grad_accum / dp
  int64_t zero = 0;          // 1 = ZeRO-1: optimizer state sharded across the DP ranks
  PipelineSchedule schedule = PipelineSchedule::kOneFOneB;
  double timeout_s = 300.0;      // a collective or rendezvous that waits longer fails, naming the missing rank
  double bucket_mb = 25.0;       // DP gradient all-reduce bucket size
  std::string backend = "auto";  // auto (gloo on cpu, nccl on cuda) | gloo | nccl
  bool sp = false;               // sequence parallelism inside the TP group (Megatron SP); needs tp > 1
  int64_t world_size() const { return dp * tp * pp; }
};

// What `keel resume` checks about the run it continues (docs/checkpoints.md).
struct ResumeConfig {
  int64_t verify_steps = 0;  // a resume checks its first K steps against the parent's logged rows; 0 = off
};

// Which plugin fills each slot (docs/plugins.md): a built-in name or a path to a shared library.
struct PluginsConfig {
  std::string optimizer = "adamw";
  std::string lr_schedule;     // "" = the built-in warm-up + cosine of optim.*
  std::string spike_handler;   // "" = built-in: skip the update on a non-finite loss or gradient only
  std::string grad_transform;  // comma-separated chain, applied in order after clipping
  std::string data_mixture;    // "" = data.mixture / data.schedule
  std::string observers;       // comma-separated
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  OptimConfig optim;
  DataConfig data;
  MetricsConfig metrics;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;
  PluginsConfig plugins;
  ResumeConfig resume;
  // [plugin.NAME] sections: arguments of plugin NAME (key -> value), checked by the plugin when it loads.
  std::map<std::string, std::map<std::string, std::string>> plugin_args;
  std::string source_file;  // where it was loaded from (for messages)

  // Global batch in sequences: the same for every layout (DP ranks split it, docs/parallel.md).
  int64_t global_batch() const { return train.micro_batch * train.grad_accum; }
  int64_t tokens_per_step() const { return global_batch() * model.seq_len; }
  // Length of warm-up + cosine: optim.decay_steps, or train.steps when that is 0.
  int64_t lr_decay_steps() const { return optim.decay_steps > 0 ? optim.decay_steps : train.steps; }
  // Micro-batches each DP rank runs per step (parallel.microbatches, or grad_accum / dp).
  int64_t microbatches_per_rank() const {
    return parallel.microbatches > 0 ? parallel.microbatches : train.grad_accum / parallel.dp;
  }
  // Sequences per micro-batch on one DP rank.
  int64_t rank_micro_batch() const { return global_batch() / parallel.dp / microbatches_per_rank(); }
};

// Parse an INI file ("[model]\nlayers = 4"), then apply "key=value" overrides in order (a key set twice by
// overrides: the last wins), then validate. Throws ConfigError naming the file:line and key for unknown keys,
// bad values, a key or section header that appears twice in the file, or a missing file.
// Paths come back absolute: a relative data.dir or source input (and the default data.dir) resolves against
// the config file's directory, one given in an override against the current directory. A resolved config.ini
// (to_ini's header line: run dirs, checkpoints) resolves against the current directory instead, as Keel wrote
// relative paths there before it resolved them.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from INI text already in memory; `source_name` names it in messages ("NAME:LINE") and becomes
// source_file; relative paths resolve against the current directory. The fuzzer (tests/fuzz/) feeds it bytes
// directly. Any input, however malformed, either parses or throws ConfigError.
Config parse_config_text(const std::string& text, const std::string& source_name,
                         const std::vector<std::string>& overrides = {});
// Apply one "section.key=value" override (also used by tests).
void apply_override(Config& config, const std::string& key_equals_value, const std::string& origin = "--set");
void set_key(Config& config, const std::string& key, const std::string& value, const std::string& origin);
// Cross-field checks (heads divide d_model, ...); throws ConfigError naming the keys.
void validate(const Config& config);
// Flat, ordered (key, value) list of the resolved config, and the same as INI text that load_config reads back.
std::vector<std::pair<std::string, std::string>> flatten(const Config& config);
std::string to_ini(const Config& config);
// Every known key with its one-line documentation (for `keel config keys` and docs).
std::vector<std::pair<std::string, std::string>> documented_keys();

}  // namespace keel

// Why: the single key table behind every configurable value. Parsing is strict on purpose: a typo in an
// experiment config must stop the run before it starts, naming the file, line and key, rather than train for
// hours with a default.
#include "core/config/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "core/config/batch_schedule.h"

namespace keel {
namespace {

std::string trim(const std::string& s) {
  const auto begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  const auto end = s.find_last_not_of(" \t\r\n");
  return s.substr(begin, end - begin + 1);
}

[[noreturn]] void bad_value(const std::string& origin, const std::string& key, const std::string& value,
                            const std::string& expected) {
  throw ConfigError(origin + ": " + key + ": expected " + expected + ", got '" + value + "'");
}

int64_t parse_int(const std::string& origin, const std::string& key, const std::string& value) {
  try {
    size_t used = 0;
    const long long parsed = std::stoll(value, &used);
    if (used != value.size()) bad_value(origin, key, value, "an integer");
    return parsed;
  } catch (const std::logic_error&) {
    bad_value(origin, key, value, "an integer");
  }
}

// Seeds are unsigned 64-bit: parsed as such (a negative seed is refused rather than wrapped, so that the value
// written back by to_ini() is the value read).
uint64_t parse_uint64(const std::string& origin, const std::string& key, const std::string& value) {
  if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos)
    bad_value(origin, key, value, "an integer in [0, 2^64)");
  try {
    return std::stoull(value);
  } catch (const std::logic_error&) {
    bad_value(origin, key, value, "an integer in [0, 2^64)");
  }
}

// strtod, not std::stod: stod throws on subnormal numbers (ERANGE), which format_double can write, so a
// resolved config holding one would not read back. Overflow still fails (it gives an infinity).
double parse_double(const std::string& origin, const std::string& key, const std::string& value) {
  char* end = nullptr;
  const double parsed = std::strtod(value.c_str(), &end);
  if (value.empty() || end != value.c_str() + value.size()) bad_value(origin, key, value, "a number");
  if (!std::isfinite(parsed)) bad_value(origin, key, value, "a finite number");
  return parsed;
}

bool parse_bool(const std::string& origin, const std::string& key, const std::string& value) {
  if (value == "true" || value == "1" || value == "yes" || value == "on") return true;
  if (value == "false" || value == "0" || value == "no" || value == "off") return false;
  bad_value(origin, key, value, "true or false");
}

std::string parse_choice(const std::string& origin, const std::string& key, const std::string& value,
                         const std::vector<std::string>& choices) {
  if (std::find(choices.begin(), choices.end(), value) != choices.end()) return value;
  std::string joined;
  for (const auto& c : choices) joined += (joined.empty() ? "" : " | ") + c;
  bad_value(origin, key, value, "one of " + joined);
}

std::vector<std::string> split_list(const std::string& value) {
  std::vector<std::string> out;
  std::stringstream stream(value);
  std::string item;
  while (std::getline(stream, item, ',')) {
    item = trim(item);
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// The shortest decimal that reads back as the same double ("0.003", not "0.0030000000000000001").
std::string format_double(double v) {
  for (int precision = 15; precision <= 17; ++precision) {
    std::ostringstream out;
    out.precision(precision);
    out << v;
    if (precision == 17 || std::strtod(out.str().c_str(), nullptr) == v) return out.str();
  }
  return {};
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

// The spelling of each enum value in config files, in the order the error message lists them.
const std::pair<Device, const char*> kDeviceNames[] = {{Device::kCpu, "cpu"}, {Device::kCuda, "cuda"}};
const std::pair<Precision, const char*> kPrecisionNames[] = {{Precision::kFp32, "fp32"},
                                                             {Precision::kBf16Mixed, "bf16-mixed"}};
const std::pair<NormKind, const char*> kNormNames[] = {{NormKind::kRmsNorm, "rmsnorm"},
                                                       {NormKind::kLayerNorm, "layernorm"}};
const std::pair<PipelineSchedule, const char*> kScheduleNames[] = {{PipelineSchedule::kOneFOneB, "1f1b"},
                                                                   {PipelineSchedule::kGPipe, "gpipe"}};
const std::pair<Recompute, const char*> kRecomputeNames[] = {
    {Recompute::kNone, "none"}, {Recompute::kFull, "full"}, {Recompute::kSelective, "selective"}};
const std::pair<Parametrization, const char*> kParametrizationNames[] = {{Parametrization::kStandard, "standard"},
                                                                         {Parametrization::kMup, "mup"}};

template <typename E, size_t N>
std::string name_in(const std::pair<E, const char*> (&names)[N], E value) {
  for (const auto& [e, name] : names)
    if (e == value) return name;
  throw std::logic_error("config: enum value " + std::to_string(static_cast<int>(value)) + " has no name");
}

template <typename E, size_t N>
E parse_named(const std::string& origin, const std::string& key, const std::string& value,
              const std::pair<E, const char*> (&names)[N]) {
  std::string joined;
  for (const auto& [e, name] : names) {
    if (value == name) return e;
    joined += (joined.empty() ? "" : " | ") + std::string(name);
  }
  bad_value(origin, key, value, "one of " + joined);
}

struct KeyDef {
  std::string name;
  std::string doc;
  std::function<void(Config&, const std::string& origin, const std::string& value)> set;
  std::function<std::string(const Config&)> get;
};

#define KEEL_INT(KEY, FIELD, DOC)                                                                            \
  KeyDef {                                                                                                   \
    KEY, DOC, [](Config& c, const std::string& o, const std::string& v) { c.FIELD = parse_int(o, KEY, v); }, \
        [](const Config& c) { return std::to_string(c.FIELD); }                                              \
  }
#define KEEL_DOUBLE(KEY, FIELD, DOC)                                                                            \
  KeyDef {                                                                                                      \
    KEY, DOC, [](Config& c, const std::string& o, const std::string& v) { c.FIELD = parse_double(o, KEY, v); }, \
        [](const Config& c) { return format_double(c.FIELD); }                                                  \
  }
#define KEEL_BOOL(KEY, FIELD, DOC)                                                                            \
  KeyDef {                                                                                                    \
    KEY, DOC, [](Config& c, const std::string& o, const std::string& v) { c.FIELD = parse_bool(o, KEY, v); }, \
        [](const Config& c) { return std::string(c.FIELD ? "true" : "false"); }                               \
  }
#define KEEL_STRING(KEY, FIELD, DOC)                                                    \
  KeyDef {                                                                              \
    KEY, DOC, [](Config& c, const std::string&, const std::string& v) { c.FIELD = v; }, \
        [](const Config& c) { return c.FIELD; }                                         \
  }
#define KEEL_ENUM(KEY, FIELD, DOC, NAMES)                                                                             \
  KeyDef {                                                                                                            \
    KEY, DOC, [](Config& c, const std::string& o, const std::string& v) { c.FIELD = parse_named(o, KEY, v, NAMES); }, \
        [](const Config& c) { return name_of(c.FIELD); }                                                              \
  }
#define KEEL_CHOICE(KEY, FIELD, DOC, ...)                           \
  KeyDef {                                                          \
    KEY, DOC,                                                       \
        [](Config& c, const std::string& o, const std::string& v) { \
          c.FIELD = parse_choice(o, KEY, v, {__VA_ARGS__});         \
        },                                                          \
        [](const Config& c) { return c.FIELD; }                     \
  }

const std::vector<KeyDef>& key_table() {
  static const std::vector<KeyDef> table = {
      KEEL_INT("model.layers", model.layers, "number of decoder blocks (L)"),
      KEEL_INT("model.d_model", model.d_model, "residual width (C)"),
      KEEL_INT("model.heads", model.heads, "attention heads (H)"),
      KEEL_INT("model.kv_heads", model.kv_heads, "key/value heads; fewer than heads = grouped-query attention"),
      KEEL_INT("model.ffn_hidden", model.ffn_hidden, "SwiGLU hidden width"),
      KEEL_INT("model.vocab", model.vocab, "vocabulary size (V); also the tokenizer's size"),
      KEEL_INT("model.seq_len", model.seq_len, "sequence length (T)"),
      KEEL_ENUM("model.norm", model.norm, "normalisation layer", kNormNames),
      KEEL_DOUBLE("model.norm_eps", model.norm_eps, "epsilon of the norm layers"),
      KEEL_DOUBLE("model.rotary_fraction", model.rotary_fraction,
                  "share of head dims that get RoPE (1.0 LLaMA/K2, 0.25 CrystalCoder)"),
      KEEL_DOUBLE("model.rope_theta", model.rope_theta, "RoPE base"),
      KEEL_BOOL("model.tie_embeddings", model.tie_embeddings, "share input embedding and output head"),
      KEEL_BOOL("model.qk_norm", model.qk_norm, "RMS-normalise queries and keys per head"),
      KEEL_DOUBLE("model.z_loss", model.z_loss, "z-loss coefficient on (log Z)^2; 0 disables"),
      KEEL_DOUBLE("model.init_std", model.init_std, "normal init std (output projections scaled by 1/sqrt(2L))"),

      KEEL_INT("train.steps", train.steps, "total optimizer steps of the run"),
      KEEL_INT("train.micro_batch", train.micro_batch, "sequences per micro-batch"),
      KEEL_INT("train.grad_accum", train.grad_accum, "micro-batches accumulated per step"),
      KeyDef{"train.seed", "seed of model init and other non-data randomness",
             [](Config& c, const std::string& o, const std::string& v) {
               c.train.seed = parse_uint64(o, "train.seed", v);
             },
             [](const Config& c) { return std::to_string(c.train.seed); }},
      KEEL_ENUM("train.precision", train.precision, "numeric precision", kPrecisionNames),
      KEEL_INT("train.log_every", train.log_every, "console progress line every N steps"),
      KEEL_ENUM("train.device", train.device, "device to train on", kDeviceNames),
      KEEL_INT("train.threads", train.threads, "intra-op CPU threads; 0 = all CPUs"),

      KEEL_DOUBLE("optim.lr", optim.lr, "peak learning rate"),
      KEEL_DOUBLE("optim.min_lr", optim.min_lr, "cosine floor"),
      KEEL_INT("optim.warmup_steps", optim.warmup_steps, "linear warm-up steps"),
      KEEL_INT("optim.decay_steps", optim.decay_steps, "warm-up + cosine length; 0 = train.steps"),
      KEEL_DOUBLE("optim.beta1", optim.beta1, "AdamW beta1"),
      KEEL_DOUBLE("optim.beta2", optim.beta2, "AdamW beta2"),
      KEEL_DOUBLE("optim.eps", optim.eps, "AdamW epsilon"),
      KEEL_DOUBLE("optim.weight_decay", optim.weight_decay, "decoupled weight decay (matrices only)"),
      KEEL_DOUBLE("optim.grad_clip", optim.grad_clip, "global grad-norm clip; 0 disables"),

      KEEL_STRING("data.dir", data.dir,
                  "directory of the prepared tokenizer and shards; relative: to the config file's directory "
                  "(to the current directory in --set)"),
      KeyDef{
          "data.seed", "seed of the data order (permutations, source picks)",
          [](Config& c, const std::string& o, const std::string& v) { c.data.seed = parse_uint64(o, "data.seed", v); },
          [](const Config& c) { return std::to_string(c.data.seed); }},
      KEEL_STRING("data.mixture", data.mixture, "source weights, e.g. prose=0.7,code=0.3"),
      KEEL_STRING("data.schedule", data.schedule, "stages, e.g. 0:prose=0.7,code=0.3;500:prose=0.3,code=0.7"),
      KEEL_STRING("data.skip", data.skip, "skip list, e.g. prose:chunk:3;code:samples:100-200"),
      KEEL_INT("data.chunks", data.chunks, "chunks per source epoch (LLM360: 360)"),
      KEEL_INT("data.tokenizer_sample_mb", data.tokenizer_sample_mb, "MiB of raw text to train the tokenizer"),

      KEEL_INT("metrics.flush_every", metrics.flush_every, "flush metrics.h5 every N steps"),
      KEEL_BOOL("metrics.per_tensor", metrics.per_tensor, "log per-tensor grad and param norms"),

      KEEL_INT("parallel.dp", parallel.dp, "data-parallel size (replicas, each reading a disjoint batch slice)"),
      KEEL_INT("parallel.tp", parallel.tp, "tensor-parallel size (heads, FFN, vocabulary split)"),
      KEEL_INT("parallel.pp", parallel.pp, "pipeline-parallel stages (model.layers split evenly)"),
      KEEL_INT("parallel.microbatches", parallel.microbatches,
               "micro-batches per DP rank and step; 0 = train.grad_accum / parallel.dp"),
      KEEL_INT("parallel.zero", parallel.zero, "1 = ZeRO-1 (optimizer state sharded across DP ranks); 0 = off"),
      KEEL_ENUM("parallel.schedule", parallel.schedule, "pipeline schedule", kScheduleNames),
      KEEL_DOUBLE("parallel.timeout_s", parallel.timeout_s,
                  "seconds a collective or the rendezvous may wait before the job fails naming the missing rank"),
      KEEL_DOUBLE("parallel.bucket_mb", parallel.bucket_mb, "data-parallel gradient all-reduce bucket size in MiB"),
      KEEL_CHOICE("parallel.backend", parallel.backend, "c10d backend: auto (gloo on cpu, nccl on cuda)", "auto",
                  "gloo", "nccl"),

      KEEL_STRING("plugins.optimizer", plugins.optimizer, "optimizer plugin: adamw, lion, muon, or a path to a .so"),
      KEEL_STRING("plugins.lr_schedule", plugins.lr_schedule,
                  "LR schedule plugin; empty = warm-up + cosine of optim.*"),
      KEEL_STRING("plugins.spike_handler", plugins.spike_handler,
                  "spike handler plugin (zscore_skip, rollback_skip, lr_cooldown, moment_surgery, ...); empty = skip "
                  "non-finite steps"),
      KEEL_STRING("plugins.grad_transform", plugins.grad_transform,
                  "gradient transforms, comma-separated chain (embedding_grad_shrink, update_clip, ...)"),
      KEEL_STRING("plugins.data_mixture", plugins.data_mixture, "data mixture plugin (static, staged, linear_ramp)"),
      KEEL_STRING("plugins.observers", plugins.observers, "observer plugins, comma-separated"),

      KEEL_INT("checkpoint.every", checkpoint.every, "save a checkpoint every N steps; 0 = none periodic"),
      KEEL_BOOL("checkpoint.at_end", checkpoint.at_end, "save a checkpoint after the last step"),
      KEEL_INT("checkpoint.keep_last", checkpoint.keep_last, "newest checkpoints kept (>= 2); 0 = keep all"),
      KEEL_INT("checkpoint.milestone_every", checkpoint.milestone_every,
               "checkpoints at steps divisible by M are kept forever; 0 = none"),

  };
  return table;
}

// Keys of `[source.NAME]` sections: source.NAME.FIELD.
const std::vector<std::pair<std::string, std::string>>& source_fields() {
  static const std::vector<std::pair<std::string, std::string>> fields = {
      {"inputs", "comma-separated files, directories or globs; relative: as data.dir"},
      {"include", "filename glob inside directories, e.g. *.py"},
      {"split", "file (one document per file) or fortune ('%' lines separate documents)"},
      {"max_mb", "stop reading raw text after this many MiB; 0 = all"},
      {"format",
       "text (default; Keel tokenizes), megatron (PREFIX.bin + PREFIX.idx), npy (.npy or raw token arrays, "
       "documents separated by data.eos_id) or jsonl-tokens (JSON lines with token_ids, .gz allowed, parsed once "
       "into a cache): pre-tokenized formats are read in place"},
      {"dtype", "uint16 or uint32: element type of raw (non-.npy) token files of format npy"},
      {"heldout",
       "held-out documents never trained on (keel eval's default split): >= 1 a count, in (0, 1) a fraction, 0 "
       "none; absent = 1% and at least 1 when the source has >= 2 documents (every format)"},
  };
  return fields;
}

SourceConfig& source_named(Config& config, const std::string& name) {
  for (auto& source : config.data.sources)
    if (source.name == name) return source;
  config.data.sources.push_back(SourceConfig{});
  config.data.sources.back().name = name;
  return config.data.sources.back();
}

bool set_source_key(Config& config, const std::string& key, const std::string& value, const std::string& origin) {
  if (key.rfind("source.", 0) != 0) return false;
  const std::string rest = key.substr(7);
  const auto dot = rest.rfind('.');
  if (dot == std::string::npos || dot == 0)
    throw ConfigError(origin + ": bad source key '" + key + "' (use [source.NAME])");
  const std::string name = rest.substr(0, dot);
  const std::string field = rest.substr(dot + 1);
  for (char ch : name)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-'))
      throw ConfigError(origin + ": " + key + ": source names use letters, digits, '_' and '-'");
  SourceConfig& source = source_named(config, name);
  if (field == "inputs")
    source.inputs = split_list(value);
  else if (field == "include")
    source.include = value;
  else if (field == "split")
    source.split = parse_choice(origin, key, value, {"file", "fortune"});
  else if (field == "max_mb")
    source.max_mb = parse_double(origin, key, value);
  else if (field == "format")
    source.format = parse_choice(origin, key, value, {"text", "megatron", "npy", "jsonl-tokens"});
  else if (field == "dtype")
    source.dtype = parse_choice(origin, key, value, {"uint16", "uint32"});
  else if (field == "heldout")
    source.heldout = parse_double(origin, key, value);
  else
    throw ConfigError(origin + ": unknown key '" + key + "'");
  return true;
}

}  // namespace

std::string name_of(Device device) { return name_in(kDeviceNames, device); }
std::string name_of(Precision precision) { return name_in(kPrecisionNames, precision); }
std::string name_of(NormKind norm) { return name_in(kNormNames, norm); }
std::string name_of(PipelineSchedule schedule) { return name_in(kScheduleNames, schedule); }
std::string name_of(Recompute recompute) { return name_in(kRecomputeNames, recompute); }
std::string name_of(Parametrization parametrization) { return name_in(kParametrizationNames, parametrization); }

void set_key(Config& config, const std::string& key, const std::string& value, const std::string& origin) {
  // Every value must survive to_ini() and back (run dirs store the resolved config, and resume reads it): a
  // '#' would be cut off there as a comment, a newline would split the line. INI files cannot hold either, so
  // this only refuses `--set` values that no config file could express.
  for (const char ch : value) {
    const auto byte = static_cast<unsigned char>(ch);
    if (ch == '#' || (byte < 0x20 && ch != '\t') || byte == 0x7f)
      throw ConfigError(origin + ": " + key + ": values cannot contain '#' or control characters");
  }
  if (set_source_key(config, key, value, origin)) return;
  if (key.rfind("plugin.", 0) == 0) {  // [plugin.NAME] key = value: free-form, checked by the plugin
    const std::string rest = key.substr(7);
    const auto dot = rest.find('.');
    const std::string name = dot == std::string::npos ? "" : rest.substr(0, dot);
    const std::string field = dot == std::string::npos ? "" : rest.substr(dot + 1);
    auto plain = [](const std::string& s) {
      return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-';
      });
    };
    if (!plain(name) || !plain(field))
      throw ConfigError(origin + ": bad plugin argument '" + key +
                        "' (use plugin.NAME.key, letters, digits, '_', '-')");
    config.plugin_args[name][field] = value;
    return;
  }
  if (key == "parallel.sp") {  // outside key_table like data.eos_id: written only when true
    config.parallel.sp = parse_bool(origin, key, value);
    return;
  }
  if (key == "model.recompute") {  // outside key_table like data.eos_id: written only when not none
    config.model.recompute = parse_named(origin, key, value, kRecomputeNames);
    return;
  }
  if (key == "model.parametrization") {  // outside key_table like data.eos_id: written only when not standard
    config.model.parametrization = parse_named(origin, key, value, kParametrizationNames);
    return;
  }
  if (key == "model.mup_base_d_model") {  // outside key_table like data.eos_id: written only when set
    config.model.mup_base_d_model = parse_int(origin, key, value);
    return;
  }
  if (key == "data.eos_id") {  // outside key_table: written to config.ini only when set (config hashes unchanged)
    config.data.eos_id = parse_int(origin, key, value);
    return;
  }
  if (key == "data.tokenizer") {  // outside key_table like data.eos_id: written only when set
    config.data.tokenizer = value;
    return;
  }
  if (key == "resume.verify_steps") {  // outside key_table like data.eos_id: written only when > 0
    config.resume.verify_steps = parse_int(origin, key, value);
    return;
  }
  if (key == "data.add_bos") {  // outside key_table like data.eos_id: written only when true
    config.data.add_bos = parse_bool(origin, key, value);
    return;
  }
  if (key == "checkpoint.async") {  // outside key_table like data.eos_id: written only when true
    config.checkpoint.async = parse_bool(origin, key, value);
    return;
  }
  if (key == "metrics.stats_every") {  // outside key_table like data.eos_id: written only when > 0
    config.metrics.stats_every = parse_int(origin, key, value);
    return;
  }
  if (key == "train.batch_schedule") {  // outside key_table like data.eos_id: written only when set
    config.train.batch_schedule = value;
    return;
  }
  for (const auto& def : key_table()) {
    if (def.name == key) {
      def.set(config, origin, value);
      return;
    }
  }
  throw ConfigError(origin + ": unknown key '" + key + "' (`keel config keys` lists them)");
}

void apply_override(Config& config, const std::string& key_equals_value, const std::string& origin) {
  const auto eq = key_equals_value.find('=');
  if (eq == std::string::npos) throw ConfigError(origin + ": expected key=value, got '" + key_equals_value + "'");
  set_key(config, trim(key_equals_value.substr(0, eq)), trim(key_equals_value.substr(eq + 1)),
          origin + " " + trim(key_equals_value.substr(0, eq)));
}

namespace {

// The first line of every config that to_ini() writes (run dirs, checkpoints).
const char* const kResolvedHeader = "# resolved Keel config (every key, defaults included)";

// `value` made absolute against `base` (already absolute), written without "." and ".." where it can be. The
// result must read back from the resolved config.ini like any value: no '#', no control characters.
std::string absolute_against(const std::string& value, const std::filesystem::path& base, const std::string& key,
                             const std::string& origin) {
  namespace fs = std::filesystem;
  const fs::path path(value);
  if (value.empty() || path.is_absolute()) return value;
  fs::path out = (base / path).lexically_normal();
  if (out.filename().empty() && out.has_parent_path() && out != out.root_path()) out = out.parent_path();  // "d/"
  const std::string resolved = out.string();
  // An INI value loses trailing blanks when read back ("d/x /" resolves to "d/x "): refuse it like '#'.
  if (!resolved.empty() && (resolved.back() == ' ' || resolved.back() == '\t')) {
    throw ConfigError(origin + ": " + key + ": '" + value + "' resolves to '" + resolved +
                      "', which ends in a blank (a config file cannot hold it): give an absolute path");
  }
  for (const char ch : resolved) {
    const auto byte = static_cast<unsigned char>(ch);
    if (ch == '#' || (byte < 0x20 && ch != '\t') || byte == 0x7f) {
      throw ConfigError(origin + ": " + key + ": '" + value + "' resolves to " + resolved +
                        ", which contains '#' or a control character (a config file cannot hold it): give an "
                        "absolute path");
    }
  }
  return resolved;
}

// Every relative path of the config (data.dir, each source's inputs) made absolute against `base`. Idempotent:
// paths already absolute stay as they are, so a later call only resolves values set since.
void resolve_paths(Config& config, const std::filesystem::path& base, const std::string& origin) {
  config.data.dir = absolute_against(config.data.dir, base, "data.dir", origin);
  config.data.tokenizer = absolute_against(config.data.tokenizer, base, "data.tokenizer", origin);
  for (auto& source : config.data.sources) {
    for (auto& input : source.inputs)
      input = absolute_against(input, base, "source." + source.name + ".inputs", origin);
  }
}

std::filesystem::path current_dir(const std::string& origin) {
  std::error_code ec;
  const auto dir = std::filesystem::current_path(ec);
  if (ec) throw ConfigError(origin + ": cannot resolve relative paths: the current directory: " + ec.message());
  return dir;
}

// parse_config_text with the directory that the text's own relative paths resolve against (empty = the current
// directory). Overrides always resolve against the current directory: the user typed them there.
Config parse_config(const std::string& text, const std::string& source_name, const std::vector<std::string>& overrides,
                    const std::filesystem::path& file_base) {
  std::istringstream in(text);
  Config config;
  config.source_file = source_name;
  std::string line;
  std::string section;
  int line_number = 0;
  // First line of each section header and each key: a repeated one is an error, not "the last one wins".
  std::map<std::string, int> section_lines, key_lines;
  while (std::getline(in, line)) {
    ++line_number;
    const std::string origin = source_name + ":" + std::to_string(line_number);
    // '#' starts a comment anywhere; ';' only at the start of a line (values such as schedules contain ';').
    const auto comment = line.find('#');
    if (comment != std::string::npos) line = line.substr(0, comment);
    line = trim(line);
    if (!line.empty() && line.front() == ';') continue;
    if (line.empty()) continue;
    if (line.front() == '[') {
      if (line.back() != ']') throw ConfigError(origin + ": malformed section header '" + line + "'");
      section = trim(line.substr(1, line.size() - 2));
      if (section.empty()) throw ConfigError(origin + ": empty section name");
      const auto [seen, first] = section_lines.emplace(section, line_number);
      if (!first) {
        throw ConfigError(origin + ": section [" + section + "] already appears on line " +
                          std::to_string(seen->second));
      }
      continue;
    }
    const auto eq = line.find('=');
    if (eq == std::string::npos) throw ConfigError(origin + ": expected 'key = value', got '" + line + "'");
    const std::string key = trim(line.substr(0, eq));
    if (key.empty()) throw ConfigError(origin + ": missing key before '='");
    const std::string full_key = section.empty() ? key : section + "." + key;
    const auto [seen, first] = key_lines.emplace(full_key, line_number);
    if (!first) {
      throw ConfigError(origin + ": key " + full_key + " is already set on line " + std::to_string(seen->second));
    }
    set_key(config, full_key, trim(line.substr(eq + 1)), origin);
  }
  resolve_paths(config, file_base.empty() ? current_dir(source_name) : file_base, source_name);
  for (const auto& override_text : overrides) {
    apply_override(config, override_text, "--set");
    resolve_paths(config, current_dir("--set"), "--set");
  }
  validate(config);
  return config;
}

}  // namespace

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  // A directory opens as a stream that reads nothing; without this check it would parse as an empty config.
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw ConfigError("config path is a directory, not a file: " + path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("config file not found or unreadable: " + path);
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError("config file unreadable: " + path);
  // Relative paths in a config file are relative to the file's directory. A resolved config.ini (run dirs,
  // checkpoints) holds absolute paths; one written before paths were resolved holds paths relative to the
  // directory Keel ran in, so those keep resolving against the current directory.
  std::filesystem::path base;
  if (text.str().rfind(kResolvedHeader, 0) != 0) {
    const std::filesystem::path dir = std::filesystem::absolute(path, ec).parent_path();
    if (ec) throw ConfigError(path + ": cannot resolve its directory: " + ec.message());
    base = std::filesystem::weakly_canonical(dir, ec);
    if (ec) base = dir;
  }
  return parse_config(text.str(), path, overrides, base);
}

Config parse_config_text(const std::string& text, const std::string& source_name,
                         const std::vector<std::string>& overrides) {
  return parse_config(text, source_name, overrides, {});
}

void validate(const Config& c) {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw ConfigError("invalid config: " + message);
  };
  const auto& m = c.model;
  require(m.layers >= 1, "model.layers must be >= 1");
  require(m.d_model >= 1 && m.heads >= 1, "model.d_model and model.heads must be >= 1");
  require(m.d_model % m.heads == 0, "model.d_model (" + std::to_string(m.d_model) +
                                        ") must be divisible by model.heads (" + std::to_string(m.heads) + ")");
  require(m.kv_heads >= 1 && m.heads % m.kv_heads == 0, "model.heads (" + std::to_string(m.heads) +
                                                            ") must be divisible by model.kv_heads (" +
                                                            std::to_string(m.kv_heads) + ")");
  require(m.head_dim() % 2 == 0, "head dim model.d_model/model.heads must be even for RoPE");
  require(m.ffn_hidden >= 1 && m.vocab >= 16 && m.seq_len >= 2,
          "model.ffn_hidden, model.vocab (>= 16), model.seq_len (>= 2)");
  require(m.rotary_fraction >= 0.0 && m.rotary_fraction <= 1.0, "model.rotary_fraction must be in [0, 1]");
  require(m.rope_theta > 0.0 && m.init_std > 0.0 && m.norm_eps > 0.0,
          "model.rope_theta, model.init_std, model.norm_eps must be > 0");
  require(m.z_loss >= 0.0, "model.z_loss must be >= 0");
  require(c.train.steps >= 0, "train.steps must be >= 0");
  require(c.train.micro_batch >= 1 && c.train.grad_accum >= 1, "train.micro_batch and train.grad_accum must be >= 1");
  int64_t global_batch = 0, tokens_per_step = 0;  // Config::global_batch() and tokens_per_step() must not overflow
  require(!__builtin_mul_overflow(c.train.micro_batch, c.train.grad_accum, &global_batch) &&
              !__builtin_mul_overflow(global_batch, m.seq_len, &tokens_per_step),
          "train.micro_batch x train.grad_accum x model.seq_len (tokens per step) must fit in a 64-bit integer");
  require(c.train.log_every >= 1, "train.log_every must be >= 1");
  require(c.train.threads >= 0, "train.threads must be >= 0");
  const auto& o = c.optim;
  require(o.lr > 0.0 && o.min_lr >= 0.0 && o.min_lr <= o.lr, "optim.lr > 0 and 0 <= optim.min_lr <= optim.lr");
  require(o.warmup_steps >= 0 && o.decay_steps >= 0, "optim.warmup_steps and optim.decay_steps must be >= 0");
  require(o.beta1 >= 0.0 && o.beta1 < 1.0 && o.beta2 >= 0.0 && o.beta2 < 1.0, "optim.beta1/beta2 must be in [0, 1)");
  require(o.eps > 0.0 && o.weight_decay >= 0.0 && o.grad_clip >= 0.0,
          "optim.eps > 0, optim.weight_decay >= 0, optim.grad_clip >= 0");
  require(c.data.chunks >= 1, "data.chunks must be >= 1");
  require(!c.data.dir.empty(), "data.dir must not be empty");
  require(c.data.tokenizer_sample_mb >= 1 && c.data.tokenizer_sample_mb <= (int64_t{1} << 20),
          "data.tokenizer_sample_mb must be in [1, 1048576]");
  require(c.resume.verify_steps >= 0,
          "resume.verify_steps must be >= 0 (0 = off), got " + std::to_string(c.resume.verify_steps));
  require(c.data.eos_id >= -1 && c.data.eos_id < c.model.vocab,
          "data.eos_id must be -1 (unset) or in [0, model.vocab)");
  const auto& par = c.parallel;
  require(par.dp >= 1 && par.tp >= 1 && par.pp >= 1, "parallel.dp, parallel.tp and parallel.pp must be >= 1");
  require(par.zero == 0 || par.zero == 1, "parallel.zero must be 0 or 1");
  require(par.microbatches >= 0, "parallel.microbatches must be >= 0");
  require(par.timeout_s > 0.0 && par.bucket_mb > 0.0, "parallel.timeout_s and parallel.bucket_mb must be > 0");
  const int64_t batch = c.train.micro_batch * c.train.grad_accum;
  require(batch % par.dp == 0, "the global batch (train.micro_batch x train.grad_accum = " + std::to_string(batch) +
                                   " sequences) must be divisible by parallel.dp (" + std::to_string(par.dp) + ")");
  if (par.microbatches == 0) {
    require(c.train.grad_accum % par.dp == 0, "train.grad_accum (" + std::to_string(c.train.grad_accum) +
                                                  ") must be divisible by parallel.dp (" + std::to_string(par.dp) +
                                                  "), or set parallel.microbatches");
  } else {
    require((batch / par.dp) % par.microbatches == 0,
            "each DP rank's share of the batch (" + std::to_string(batch / par.dp) +
                " sequences) must be divisible by parallel.microbatches (" + std::to_string(par.microbatches) + ")");
  }
  require(m.layers % par.pp == 0, "model.layers (" + std::to_string(m.layers) + ") must be divisible by parallel.pp (" +
                                      std::to_string(par.pp) + ")");
  for (const auto& [value, key] : {std::pair<int64_t, const char*>{m.heads, "model.heads"},
                                   {m.kv_heads, "model.kv_heads"},
                                   {m.ffn_hidden, "model.ffn_hidden"},
                                   {m.vocab, "model.vocab"}}) {
    require(value % par.tp == 0, std::string(key) + " (" + std::to_string(value) +
                                     ") must be divisible by parallel.tp (" + std::to_string(par.tp) + ")");
  }
  require(!par.sp || par.tp > 1, "parallel.sp = true needs parallel.tp > 1 (it splits the sequence over the TP group)");
  require(!par.sp || m.seq_len % par.tp == 0, "model.seq_len (" + std::to_string(m.seq_len) +
                                                  ") must be divisible by parallel.tp (" + std::to_string(par.tp) +
                                                  ") under parallel.sp = true");
  require(!(m.tie_embeddings && par.pp > 1),
          "model.tie_embeddings = true needs parallel.pp = 1 (the embedding and the head live on different stages)");
  require(c.metrics.flush_every >= 1, "metrics.flush_every must be >= 1");
  require(c.metrics.stats_every >= 0,
          "metrics.stats_every must be >= 0 (0 = off), got " + std::to_string(c.metrics.stats_every));
  require(c.checkpoint.every >= 0 && c.checkpoint.milestone_every >= 0,
          "checkpoint.every and checkpoint.milestone_every must be >= 0");
  require(c.checkpoint.keep_last == 0 || c.checkpoint.keep_last >= 2,
          "checkpoint.keep_last must be >= 2 (so that a damaged newest checkpoint has a fallback), or 0 to keep all");
  for (const auto& s : c.data.sources) {
    require(!s.inputs.empty(), "source." + s.name + ".inputs is empty");
    require(s.max_mb >= 0.0, "source." + s.name + ".max_mb must be >= 0");
    require(s.dtype.empty() || s.format == "npy", "source." + s.name + ".dtype needs format = npy");
    require(s.heldout == -1.0 || (s.heldout >= 0.0 && (s.heldout < 1.0 || s.heldout == std::floor(s.heldout))),
            "source." + s.name + ".heldout must be a document count (>= 1), a fraction in (0, 1) or 0, got " +
                format_double(s.heldout));
  }
  require(c.model.mup_base_d_model >= 0,
          "model.mup_base_d_model must be >= 0 (0 = d_model), got " + std::to_string(c.model.mup_base_d_model));
  require(c.model.mup_base_d_model == 0 || c.model.parametrization == Parametrization::kMup,
          "model.mup_base_d_model is set but model.parametrization is standard: set model.parametrization = mup");
  require(c.model.mup_base_d_model % c.model.heads == 0,
          "model.mup_base_d_model " + std::to_string(c.model.mup_base_d_model) + " must be divisible by model.heads " +
              std::to_string(c.model.heads) + " (the base model's head dim anchors the attention scale)");
  validate_batch_schedule(c);
}

std::vector<std::pair<std::string, std::string>> flatten(const Config& config) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& def : key_table()) out.emplace_back(def.name, def.get(config));
  // Keys written only when not at their default (config.ini and config hashes of existing runs unchanged), each
  // after the last key of its section so that the section stays one block in config.ini.
  const auto add_to_section = [&out](const std::string& key, const std::string& value) {
    const std::string section = key.substr(0, key.find('.') + 1);  // "model."
    auto at = out.end();
    for (auto it = out.begin(); it != out.end(); ++it)
      if (it->first.rfind(section, 0) == 0) at = it + 1;
    out.insert(at, {key, value});
  };
  if (config.data.eos_id >= 0) add_to_section("data.eos_id", std::to_string(config.data.eos_id));
  if (!config.data.tokenizer.empty()) add_to_section("data.tokenizer", config.data.tokenizer);
  if (config.data.add_bos) add_to_section("data.add_bos", "true");
  if (config.checkpoint.async) add_to_section("checkpoint.async", "true");
  if (config.model.recompute != Recompute::kNone) add_to_section("model.recompute", name_of(config.model.recompute));
  if (config.model.parametrization != Parametrization::kStandard)
    add_to_section("model.parametrization", name_of(config.model.parametrization));
  if (config.model.mup_base_d_model != 0)
    add_to_section("model.mup_base_d_model", std::to_string(config.model.mup_base_d_model));
  if (config.parallel.sp) add_to_section("parallel.sp", "true");
  if (!config.train.batch_schedule.empty()) add_to_section("train.batch_schedule", config.train.batch_schedule);
  if (config.metrics.stats_every > 0) add_to_section("metrics.stats_every", std::to_string(config.metrics.stats_every));
  if (config.resume.verify_steps > 0)
    out.emplace_back("resume.verify_steps", std::to_string(config.resume.verify_steps));
  for (const auto& s : config.data.sources) {
    const std::string prefix = "source." + s.name + ".";
    out.emplace_back(prefix + "inputs", join(s.inputs));
    out.emplace_back(prefix + "include", s.include);
    out.emplace_back(prefix + "split", s.split);
    out.emplace_back(prefix + "max_mb", format_double(s.max_mb));
    if (s.format != "text") out.emplace_back(prefix + "format", s.format);
    if (!s.dtype.empty()) out.emplace_back(prefix + "dtype", s.dtype);
    if (s.heldout != -1.0) out.emplace_back(prefix + "heldout", format_double(s.heldout));
  }
  for (const auto& [name, args] : config.plugin_args) {
    for (const auto& [field, value] : args) out.emplace_back("plugin." + name + "." + field, value);
  }
  return out;
}

std::string to_ini(const Config& config) {
  std::ostringstream out;
  out << kResolvedHeader << "\n";
  std::string current_section;
  for (const auto& [key, value] : flatten(config)) {
    const auto dot = key.rfind('.');
    const std::string section = key.substr(0, dot);
    if (section != current_section) {
      out << (current_section.empty() ? "" : "\n") << "[" << section << "]\n";
      current_section = section;
    }
    out << key.substr(dot + 1) << " = " << value << "\n";
  }
  return out.str();
}

std::vector<std::pair<std::string, std::string>> documented_keys() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& def : key_table()) out.emplace_back(def.name, def.doc);
  out.emplace_back("data.eos_id",
                   "separator (EOS) id of pre-tokenized sources, which come without a tokenizer; unset = -1");
  out.emplace_back("data.tokenizer",
                   "an existing SentencePiece tokenizer.model to use (copied into data.dir, its BOS/EOS/PAD ids); "
                   "unset = train one from the text sources");
  out.emplace_back("resume.verify_steps",
                   "a resume compares its first K steps bit for bit with the parent's logged rows where they "
                   "overlap, and stops naming the step and value that differ (docs/forensics.md); 0 = off");
  out.emplace_back("data.add_bos", "prepend the tokenizer's BOS id to every document (default false)");
  out.emplace_back("checkpoint.async",
                   "write, hash and commit periodic checkpoints on a background thread while training continues "
                   "(default false)");
  out.emplace_back("parallel.sp",
                   "sequence parallelism inside the TP group (Megatron SP): norms and the residual stream split along "
                   "the sequence; needs parallel.tp > 1 and model.seq_len divisible by parallel.tp (default false)");
  out.emplace_back("model.recompute",
                   "activations recomputed in backward, per block: none | full (keep each block's input) | selective "
                   "(also keep GEMM outputs; recompute norms, RoPE, attention core, SwiGLU)");
  out.emplace_back("model.parametrization",
                   "standard | mup: muP (maximal update parametrization) scales hidden-matrix init and LR, attention "
                   "and output logits by the width ratio d_model / model.mup_base_d_model (default standard)");
  out.emplace_back("model.mup_base_d_model",
                   "muP base width: the d_model the hyperparameters were tuned at; divisible by model.heads; 0 = "
                   "d_model (default 0)");
  out.emplace_back("train.batch_schedule",
                   "global batch by step, e.g. 0:8;100:16 (batch-size warm-up; each batch divisible by parallel.dp x "
                   "train.micro_batch, the first at step 0 = train.micro_batch x train.grad_accum); unset = constant");
  out.emplace_back(
      "metrics.stats_every",
      "instability precursors (attention logit max, block RMS, logit and z statistics, update/weight "
      "ratio, Adam sqrt(v) statistics) every N steps into /stats/ of metrics.h5 (docs/metrics.md); 0 = off");
  for (const auto& [field, doc] : source_fields()) out.emplace_back("source.NAME." + field, doc);
  out.emplace_back("plugin.NAME.KEY",
                   "argument KEY of plugin NAME (also --plugin-arg NAME.KEY=value); see docs/plugins.md");
  return out;
}

}  // namespace keel

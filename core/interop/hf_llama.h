// Why: Keel's decoder is the LLaMA architecture, so its weights can leave for the Hugging Face ecosystem
// (evaluation harnesses, inference servers) and come back from it (continue pretraining an HF LLaMA) as the
// `LlamaForCausalLM` layout: config.json + model.safetensors. This file is the one place that knows both
// naming schemes and both configs; what HF LLaMA cannot express (LayerNorm, partial rotary, QK-norm) is
// refused with the config key named rather than exported as a model that would silently compute something
// else. No weight is permuted: Keel's RoPE uses the rotate-half convention (core/model/llama.cpp
// apply_rotary pairs dim i with dim i + D/2, exactly as HF's `rotate_half`), and GQA maps query head h to kv
// head h / (H/K) in both (repeat_interleave vs HF's repeat_kv).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/config/config.h"

namespace keel::interop {

// Throws std::runtime_error naming the config key (model.norm, model.rotary_fraction, model.qk_norm) when
// `model` has a feature HF's LlamaForCausalLM cannot express. model.z_loss is training-only and fine.
void check_hf_expressible(const ModelConfig& model, const std::string& origin);

// "blocks.3.attn.wq.weight" -> "model.layers.3.self_attn.q_proj.weight", etc. Throws naming the tensor for a
// Keel tensor HF LLaMA has no place for.
std::string hf_name_of(const std::string& keel_name);

// config.json for `model`; torch_dtype "float32" or "bfloat16". `eos_id`, `bos_id` and `pad_id` are the special ids
// of the data's tokenizer; a negative bos or pad id (the tokenizer has none: Keel's own tokenizers) is written null.
std::string hf_config_json(const ModelConfig& model, const std::string& torch_dtype, int64_t eos_id = 1,
                           int64_t bos_id = -1, int64_t pad_id = -1);

// What an HF config.json says, as Keel's model.* overrides ("model.d_model=64", ...) plus lines to state to the
// user (max_position_embeddings against model.seq_len, where rope_theta came from).
struct HfModelConfig {
  std::vector<std::string> overrides;
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  std::string rope_theta_from;  // "rope_parameters.rope_theta", "rope_theta" or "default (absent)"
};
// Refuses (naming `origin` and the field) a missing or mistyped field, another architecture, and anything
// Keel's decoder does not compute: hidden_act other than silu, a rope_type other than "default" (in
// rope_parameters or rope_scaling), partial_rotary_factor != 1, attention/mlp biases, head_dim !=
// hidden/heads, rope_theta and rope_parameters.rope_theta that disagree.
HfModelConfig parse_hf_config(const std::string& json_text, const std::string& origin);
// parse_hf_config(...).overrides.
std::vector<std::string> keel_model_overrides_from_hf_config(const std::string& json_text, const std::string& origin);

// tokenizer_config.json for the data's SentencePiece tokenizer: LlamaTokenizer, `eos_piece` as EOS, `bos_piece` and
// `pad_piece` as BOS and PAD ("" = none: null), add_bos_token = `add_bos` (data.add_bos), no EOS added.
std::string hf_tokenizer_config_json(const std::string& eos_piece, const std::string& unk_piece, int64_t seq_len,
                                     const std::string& bos_piece = "", const std::string& pad_piece = "",
                                     bool add_bos = false);

// Hugging Face's default file size limit for sharded weights (save_pretrained's max_shard_size "5GB").
constexpr int64_t kDefaultMaxShardBytes = 5'000'000'000;

struct ExportOptions {
  bool bf16 = false;      // write BF16 tensors (torch_dtype "bfloat16") instead of the fp32 masters
  bool tokenizer = true;  // copy the prepared data's tokenizer.model + write tokenizer_config.json
  int64_t max_shard_bytes = kDefaultMaxShardBytes;  // weights above this go to several files + an index
};
// `--max-shard-size`: "5GB", "500MB", "10KB" (powers of 10, as transformers), "2GiB", "100MiB", "64KiB", or
// plain bytes. Throws naming `origin` for anything else, zero included.
int64_t parse_shard_size(const std::string& text, const std::string& origin);
// `keel export-hf`: the verified checkpoint `checkpoint_dir` (any layout) -> OUT_DIR/{model.safetensors,
// config.json, tokenizer.model, tokenizer_config.json}; weights larger than `max_shard_bytes` are written as
// model-0000i-of-0000n.safetensors (each at most that size, unless one tensor is larger) plus
// model.safetensors.index.json, as transformers' save_pretrained does. Tensors are read from the rank files and
// written one at a time (peak memory: the largest tensor). The tokenizer is the one of the checkpoint's
// prepared data (config data.dir), refused when its fingerprint differs from the checkpoint's data fingerprint.
// OUT_DIR must be missing or empty; a failure removes what the export wrote. Returns a one-line summary.
std::string export_hf(const std::string& checkpoint_dir, const std::string& out_dir, const ExportOptions& options);

struct ImportOptions {
  std::string config_path;              // data/train/optim keys come from here (model.* from config.json)
  std::vector<std::string> overrides;   // --set key=value, applied last
  bool allow_tokenizer_change = false;  // import although HF_DIR/tokenizer.model is not the prepared data's
  bool check_data = true;  // false (--dry-run): the HF side alone; the prepared data is neither opened nor compared
};

// An HF directory read, checked and converted, before anything is written: `keel import-hf` plans, then
// claims the run dir (core/cli: interop knows nothing of run dirs), then writes.
struct ImportPlan {
  std::string hf_dir;
  Config config;
  // Keel names in model order, each a placeholder: a meta tensor of the model's shape, fp32, holding no data.
  std::vector<std::pair<std::string, at::Tensor>> weights;
  // Weight i read from its safetensors file now and converted to an owned fp32 tensor (F16/BF16 widen exactly).
  std::function<at::Tensor(size_t index)> read_weight;
  int64_t parameters = 0;               // elements of all weights
  int64_t source_bytes = 0;             // their bytes in HF_DIR's files (the dtype there)
  int64_t largest_tensor_elements = 0;  // of the largest weight
  int64_t weight_files = 0;             // safetensors files they come from
  std::string data_ledger;              // the data loader's state at step 0 (JSON)
  std::string data_fingerprint;         // its fingerprint (JSON)
  int64_t max_position_embeddings = 0;
  // HF_DIR/tokenizer.model, when present: its SHA-256 and piece count ("" / 0 when absent).
  std::string tokenizer_path, tokenizer_sha256;
  int64_t tokenizer_pieces = 0;
  std::vector<std::string> notes;  // stated to the user and recorded in the lineage
};
// Everything an import checks: config.json (parse_hf_config), every tensor by name and shape from the files'
// headers (no tensor data is read, except lm_head.weight and the embedding of a tied checkpoint that stores
// both), the prepared data (vocab, ledger), and an HF tokenizer.model next to the weights (more pieces than
// vocab_size: refused naming both; another file than the prepared data's tokenizer.model: refused naming both
// hashes unless allow_tokenizer_change). Writes nothing; `keel import-hf --dry-run` stops here (with check_data
// false: the data ledger and fingerprint stay empty and the HF tokenizer is checked against model.vocab only).
ImportPlan plan_import(const std::string& hf_dir, const ImportOptions& options);

// Where an import writes: the run's config.ini and lineage.json and its checkpoints directory (the caller has
// claimed the run dir).
struct ImportTarget {
  std::string run_dir, config_ini, lineage_json, checkpoints;
};
// Writes config.ini, lineage.json and one checkpoint at step 0 through the streaming checkpoint writer
// (checkpoint::write_streamed_checkpoint), one tensor at a time: each weight read, converted to its fp32 master,
// written and dropped; then the fresh state of the config's optimizer plugin (its JSON and tensor names from
// binding it to shape-only placeholders of the weights; each weight's tensors from a new instance bound to that
// weight alone: zero moments, step 0). Peak memory is a few fp32 copies of the largest tensor (AdamW: its two
// fresh moments and the copy on the way to HDF5), not the model.
// Returns the checkpoint directory.
std::string write_import(const ImportPlan& plan, const ImportTarget& target);

}  // namespace keel::interop

// Why: Keel's decoder is the LLaMA architecture, so its weights can leave for the Hugging Face ecosystem
// (evaluation harnesses, inference servers) and come back from it (continue pretraining an HF LLaMA) as the
// `LlamaForCausalLM` layout: config.json + model.safetensors. This file is the one place that knows both
// naming schemes and both configs; what HF LLaMA cannot express (LayerNorm, partial rotary, QK-norm) is
// refused with the config key named rather than exported as a model that would silently compute something
// else. No weight is permuted: Keel's RoPE uses the rotate-half convention (core/model/llama.cpp
// apply_rotary pairs dim i with dim i + D/2, exactly as HF's `rotate_half`), and GQA maps query head h to kv
// head h / (H/K) in both (repeat_interleave vs HF's repeat_kv).
#pragma once

#include <string>
#include <vector>

#include "core/config/config.h"

namespace keel::interop {

// Throws std::runtime_error naming the config key (model.norm, model.rotary_fraction, model.qk_norm) when
// `model` has a feature HF's LlamaForCausalLM cannot express. model.z_loss is training-only and fine.
void check_hf_expressible(const ModelConfig& model, const std::string& origin);

// "blocks.3.attn.wq.weight" -> "model.layers.3.self_attn.q_proj.weight", etc. Throws naming the tensor for a
// Keel tensor HF LLaMA has no place for.
std::string hf_name_of(const std::string& keel_name);

// config.json for `model`; torch_dtype "float32" or "bfloat16".
std::string hf_config_json(const ModelConfig& model, const std::string& torch_dtype);
// The model.* config overrides ("model.d_model=64", ...) that config.json text describes. Refuses (naming
// `origin` and the field) a missing or mistyped field, another architecture, and anything Keel's decoder does
// not compute: hidden_act other than silu, rope_scaling, attention/mlp biases, head_dim != hidden/heads.
std::vector<std::string> keel_model_overrides_from_hf_config(const std::string& json_text, const std::string& origin);

struct ExportOptions {
  bool bf16 = false;  // write BF16 tensors (torch_dtype "bfloat16") instead of the fp32 masters
};
// `keel export-hf`: the verified checkpoint `checkpoint_dir` (any layout) -> OUT_DIR/{model.safetensors,
// config.json}. OUT_DIR must be missing or empty. Returns a one-line summary.
std::string export_hf(const std::string& checkpoint_dir, const std::string& out_dir, const ExportOptions& options);

struct ImportOptions {
  std::string config_path;             // data/train/optim keys come from here (model.* from config.json)
  std::vector<std::string> overrides;  // --set key=value, applied last
};
// `keel import-hf`: HF_DIR (config.json + model.safetensors, or model.safetensors.index.json and its shards)
// -> a new run dir holding RUN_DIR/checkpoints/step-00000000 with the weights as fp32 masters, a fresh AdamW
// state (zero moments, step 0), the data ledger at step 0 and a lineage naming the HF origin; resumable with
// `keel resume --from RUN_DIR`. RUN_DIR must be missing or empty. Returns the checkpoint directory.
std::string import_hf(const std::string& hf_dir, const std::string& run_dir, const ImportOptions& options);

}  // namespace keel::interop

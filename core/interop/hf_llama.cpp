// Why: the Keel <-> Hugging Face LlamaForCausalLM mapping (names, config.json) and the two conversions built
// on it (see hf_llama.h for the contract). Both directions check everything before they write anything: an
// export reads and maps every tensor before OUT_DIR gets a file, an import matches every HF tensor to a Keel
// parameter (name, shape) before the run dir is claimed.
#include "core/interop/hf_llama.h"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <stdexcept>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/checkpoint_writer.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/checkpoint/sha256.h"
#include "core/checkpoint/training_state.h"
#include "core/config/memory_estimate.h"
#include "core/data/loader.h"
#include "core/data/tokenizer.h"
#include "core/interop/safetensors.h"
#include "core/io/hdf5.h"
#include "core/io/regular_file.h"
#include "core/model/parametrization.h"
#include "core/plugin_host/plugin_host.h"

namespace keel::interop {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kWeightsFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kHfConfigFile = "config.json";
constexpr const char* kTokenizerFile = "tokenizer.model";
constexpr const char* kTokenizerConfigFile = "tokenizer_config.json";
constexpr const char* kRotaryBuffer = "rotary_emb.inv_freq";

// Keel's per-block tensor suffix -> HF's (the same [out, in] nn.Linear layout on both sides).
const std::map<std::string, std::string>& block_names() {
  static const std::map<std::string, std::string> names = {
      {"attn_norm.weight", "input_layernorm.weight"}, {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"attn.wq.weight", "self_attn.q_proj.weight"},  {"attn.wk.weight", "self_attn.k_proj.weight"},
      {"attn.wv.weight", "self_attn.v_proj.weight"},  {"attn.wo.weight", "self_attn.o_proj.weight"},
      {"mlp.w_gate.weight", "mlp.gate_proj.weight"},  {"mlp.w_up.weight", "mlp.up_proj.weight"},
      {"mlp.w_down.weight", "mlp.down_proj.weight"},
  };
  return names;
}

void refuse_non_empty_dir(const std::string& dir, const std::string& what) {
  std::error_code ec;
  if (fs::exists(dir, ec) && (!fs::is_directory(dir, ec) || !fs::is_empty(dir, ec))) {
    throw std::runtime_error(what + " " + dir + " exists and is not an empty directory: choose a new one");
  }
}

// One tensor of an HF directory: the header of its file and its entry; its bytes are read when converted.
struct HfTensor {
  std::shared_ptr<const SafetensorsHeader> file;
  SafetensorsEntry entry;
};

// Safetensors bytes -> an owned fp32 tensor (F16/BF16 widened exactly), read from its file now. An F32 tensor
// keeps the bytes it was read into (no second copy); F16/BF16 hold their bytes and the fp32 result briefly.
torch::Tensor to_fp32(const HfTensor& t) {
  auto bytes = std::make_shared<std::string>(read_safetensors_bytes(*t.file, t.entry));
  const torch::ScalarType type = t.entry.dtype == SafetensorsDtype::kF32   ? torch::kFloat
                                 : t.entry.dtype == SafetensorsDtype::kF16 ? torch::kHalf
                                                                           : torch::kBFloat16;
  torch::Tensor view = torch::from_blob(  // [entry.shape], owning `bytes`
      bytes->data(), t.entry.shape, [bytes](void*) mutable { bytes.reset(); }, torch::TensorOptions().dtype(type));
  return type == torch::kFloat ? view : view.to(torch::kFloat);
}

// A small text file of an HF directory (config.json, the index): a FIFO, a directory or a device in its place is
// refused by name before it is opened (a FIFO would block the read forever).
std::string read_hf_text_file(const std::string& path) {
  io::require_regular_file<std::runtime_error>(path);
  return checkpoint::read_small_file(path);
}

// Every tensor of HF_DIR by name: model.safetensors, or the shards model.safetensors.index.json lists. Only the
// files' headers are read (each checked whole against its file's size); tensor bytes are read one at a time.
std::map<std::string, HfTensor> read_hf_weights(const std::string& hf_dir) {
  std::map<std::string, HfTensor> tensors;
  const std::string single = hf_dir + "/" + kWeightsFile, index_path = hf_dir + "/" + kIndexFile;
  if (fs::exists(single)) {
    auto header = std::make_shared<const SafetensorsHeader>(read_safetensors_header(single));
    for (const auto& e : header->entries) tensors.emplace(e.name, HfTensor{header, e});
    return tensors;
  }
  if (!fs::exists(index_path))
    throw std::runtime_error(hf_dir + ": neither " + kWeightsFile + " nor " + kIndexFile + " found");
  const json index = json::parse(read_hf_text_file(index_path), nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    throw std::runtime_error(index_path + ": not a JSON object with a 'weight_map' object");
  }
  std::map<std::string, std::set<std::string>> names_by_shard;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string())
      throw std::runtime_error(index_path + ": weight_map entry '" + name + "' is not a file name");
    const std::string file = shard.get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
      throw std::runtime_error(index_path + ": weight_map entry '" + name + "' names '" + file +
                               "', not a plain file name");
    }
    names_by_shard[file].insert(name);
  }
  for (const auto& [file, names] : names_by_shard) {
    const std::string path = hf_dir + "/" + file;
    if (!fs::exists(path)) {
      throw std::runtime_error(path + ": missing, but " + index_path + " lists " + std::to_string(names.size()) +
                               " tensor(s) in it (e.g. '" + *names.begin() + "')");
    }
    auto header = std::make_shared<const SafetensorsHeader>(read_safetensors_header(path));
    for (const auto& e : header->entries) {
      if (!names.count(e.name))
        throw std::runtime_error(path + ": tensor '" + e.name + "' is not listed for this file in " + index_path);
      if (tensors.count(e.name))
        throw std::runtime_error(path + ": tensor '" + e.name + "' appears in more than one shard");
      tensors.emplace(e.name, HfTensor{header, e});
    }
    for (const auto& name : names) {
      if (!tensors.count(name))
        throw std::runtime_error(index_path + ": tensor '" + name + "' is listed in " + file + " but not in it");
    }
  }
  return tensors;
}

const json& field(const json& config, const char* name, const std::string& origin) {
  if (!config.contains(name)) throw std::runtime_error(origin + ": field '" + std::string(name) + "' is missing");
  return config[name];
}

int64_t positive_int(const json& config, const char* name, const std::string& origin) {
  const json& v = field(config, name, origin);
  if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
    throw std::runtime_error(origin + ": field '" + std::string(name) + "' is " + v.dump() +
                             ", expected a positive integer");
  }
  return v.get<int64_t>();
}

double positive_number(const json& config, const char* name, const std::string& origin,
                       const std::string& prefix = "") {
  const json& v = field(config, name, origin);
  if (!v.is_number() || v.get<double>() <= 0) {
    throw std::runtime_error(origin + ": field '" + prefix + std::string(name) + "' is " + v.dump() +
                             ", expected a positive number");
  }
  return v.get<double>();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Architectures near LLaMA that import-hf refuses, with what Keel's decoder does not compute (docs/interop.md).
// Keyed by model_type; the architectures entry (e.g. MistralForCausalLM) names the same family.
const std::vector<std::pair<std::string, std::string>>& refused_architectures() {
  static const std::vector<std::pair<std::string, std::string>> refused = {
      {"mistral", "sliding-window attention (sliding_window), which Keel's full causal attention does not compute"},
      {"mixtral", "mixture-of-experts MLPs (block_sparse_moe), Keel's MLP is one dense SwiGLU"},
      {"qwen2", "biases on the q/k/v projections, Keel's projections have none"},
      {"qwen3", "QK-norm inside attention, which HF LLaMA checkpoints do not carry"},
      {"gemma", "GeGLU, a scaled embedding and (1 + w) RMSNorm weights"},
      {"gemma2", "GeGLU, logit soft-capping, sliding-window layers and extra norms"},
      {"gpt_neox", "parallel attention + MLP, LayerNorm with biases, partial rotary and a fused QKV"},
      {"gpt2", "learned absolute positions, LayerNorm and fused QKV with biases"},
      {"gptj", "parallel attention + MLP, LayerNorm and interleaved partial rotary"},
      {"phi", "LayerNorm, partial rotary, parallel attention + MLP and biases"},
      {"phi3", "a fused qkv_proj and gate_up_proj and (often) long-RoPE scaling"},
      {"falcon", "parallel attention + MLP, LayerNorm and multi-query fused QKV"},
      {"olmo", "non-parametric LayerNorm (no weights) and optional QKV clipping"},
      {"cohere", "LayerNorm, parallel attention + MLP and logit scaling"},
      {"starcoder2", "LayerNorm with biases, GELU MLP and sliding-window attention"},
  };
  return refused;
}

// model_type "llama" or "LlamaForCausalLM" among the architectures; anything else is refused naming what it is and,
// for a known family, what Keel does not compute.
void refuse_other_architectures(const json& c, const std::string& origin) {
  const json type = c.value("model_type", json());
  bool llama = type == "llama";
  std::string architectures;
  if (c.contains("architectures") && c["architectures"].is_array()) {
    for (const json& a : c["architectures"]) {
      llama = llama || a == "LlamaForCausalLM";
      architectures += (architectures.empty() ? "" : ", ") + a.dump();
    }
  }
  if (llama) return;
  const std::string said = "model_type " + type.dump() + ", architectures [" + architectures + "]";
  std::string lowered = type.is_string() ? type.get<std::string>() : "";
  for (char& ch : lowered) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const auto& [family, why] : refused_architectures()) {
    if (lowered == family) {
      throw std::runtime_error(origin + ": field 'model_type' / 'architectures' (" + said +
                               "): not LlamaForCausalLM; " + family + " has " + why +
                               " (import-hf reads LLaMA-layout checkpoints only)");
    }
  }
  throw std::runtime_error(origin + ": field 'model_type' / 'architectures' (" + said +
                           "): not a LlamaForCausalLM / llama model (import-hf reads LLaMA-layout checkpoints only)");
}

// partial_rotary_factor (top level, or inside a RoPE object as `prefix`): absent, null or 1 only.
void refuse_partial_rotary(const json& c, const std::string& origin, const std::string& prefix) {
  if (!c.contains("partial_rotary_factor") || c["partial_rotary_factor"].is_null()) return;
  const json& v = c["partial_rotary_factor"];
  if (!v.is_number() || v.get<double>() != 1.0) {
    throw std::runtime_error(origin + ": field '" + prefix + "partial_rotary_factor' is " + v.dump() +
                             "; Keel's LLaMA import rotates every head dimension (partial_rotary_factor 1)");
  }
}

// RoPE settings: transformers 5 writes rope_parameters {"rope_type": "default", "rope_theta": T}; older files a
// top-level rope_theta and rope_scaling null (or an object of the same form). Only plain RoPE is accepted; a
// rope_theta given twice must agree. Absent everywhere: HF's default, 10000.
void read_rope(const json& c, const std::string& origin, HfModelConfig& out) {
  std::optional<double> top, nested;
  std::string nested_from;
  if (c.contains("rope_theta") && !c["rope_theta"].is_null()) top = positive_number(c, "rope_theta", origin);
  refuse_partial_rotary(c, origin, "");
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!c.contains(key) || c[key].is_null()) continue;
    const json& rope = c[key];
    const std::string prefix = std::string(key) + ".";
    if (!rope.is_object())
      throw std::runtime_error(origin + ": field '" + key + "' is " + rope.dump() + ", expected an object or null");
    for (const char* type_key : {"rope_type", "type"}) {
      if (rope.contains(type_key) && rope[type_key] != "default") {
        throw std::runtime_error(origin + ": field '" + key + "' has " + type_key + " " + rope[type_key].dump() +
                                 "; Keel has plain RoPE only (rope_type \"default\")");
      }
    }
    for (const auto& [name, value] : rope.items()) {
      if (name == "rope_type" || name == "type") continue;
      if (name == "rope_theta") {
        nested = positive_number(rope, "rope_theta", origin, prefix);
        nested_from = prefix + "rope_theta";
      } else if (name == "partial_rotary_factor") {
        refuse_partial_rotary(rope, origin, prefix);
      } else {
        throw std::runtime_error(origin + ": field '" + key + "' has " + name + " " + value.dump() +
                                 ", which plain RoPE does not have; Keel has plain RoPE only");
      }
    }
  }
  if (top && nested && *top != *nested) {
    throw std::runtime_error(origin + ": field 'rope_theta' is " + json(*top).dump() + " but '" + nested_from +
                             "' is " + json(*nested).dump());
  }
  out.rope_theta = nested ? *nested : top ? *top : 10000.0;
  out.rope_theta_from = nested ? nested_from : top ? "rope_theta" : "absent: HF's default";
}

}  // namespace

void check_hf_expressible(const ModelConfig& model, const std::string& origin) {
  const std::string tail = ": Hugging Face LlamaForCausalLM cannot express this model";
  if (model.norm != NormKind::kRmsNorm)
    throw std::runtime_error(origin + ": model.norm = " + name_of(model.norm) + tail + " (it uses RMSNorm)");
  if (model.rotary_fraction != 1.0) {
    throw std::runtime_error(origin + ": model.rotary_fraction = " + std::to_string(model.rotary_fraction) + tail +
                             " (it rotates every head dimension)");
  }
  if (model.qk_norm) throw std::runtime_error(origin + ": model.qk_norm = true" + tail + " (it has no QK-norm)");
  if (model::mup_width_ratio(model) != 1.0) {
    throw std::runtime_error(origin + ": model.parametrization = mup (width ratio " +
                             std::to_string(model::mup_width_ratio(model)) + ")" + tail +
                             " (it has no output-logit or attention-logit multipliers)");
  }
}

std::string hf_name_of(const std::string& keel_name) {
  if (keel_name == "embed.weight") return "model.embed_tokens.weight";
  if (keel_name == "final_norm.weight") return "model.norm.weight";
  if (keel_name == "head.weight") return "lm_head.weight";
  static const std::regex block(R"(blocks\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(keel_name, m, block)) {
    const auto it = block_names().find(m[2].str());
    if (it != block_names().end()) return "model.layers." + m[1].str() + "." + it->second;
  }
  throw std::runtime_error("tensor '" + keel_name + "' has no place in Hugging Face LlamaForCausalLM");
}

std::string hf_config_json(const ModelConfig& model, const std::string& torch_dtype, int64_t eos_id, int64_t bos_id,
                           int64_t pad_id) {
  auto id_or_null = [](int64_t id) { return id >= 0 ? json(id) : json(nullptr); };
  const json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", model.d_model},
      {"intermediate_size", model.ffn_hidden},
      {"num_hidden_layers", model.layers},
      {"num_attention_heads", model.heads},
      {"num_key_value_heads", model.kv_heads},
      {"head_dim", model.head_dim()},
      {"vocab_size", model.vocab},
      {"max_position_embeddings", model.seq_len},
      {"rms_norm_eps", model.norm_eps},
      {"rope_theta", model.rope_theta},
      {"rope_scaling", nullptr},
      {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", model.rope_theta}}},  // transformers 5
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", model.tie_embeddings},
      {"torch_dtype", torch_dtype},
      {"bos_token_id", id_or_null(bos_id)},
      {"eos_token_id", eos_id},
      {"pad_token_id", id_or_null(pad_id)},
  };
  return config.dump(2) + "\n";
}

HfModelConfig parse_hf_config(const std::string& json_text, const std::string& origin) {
  const json c = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (c.is_discarded() || !c.is_object()) throw std::runtime_error(origin + ": not a JSON object");
  refuse_other_architectures(c, origin);
  const int64_t hidden = positive_int(c, "hidden_size", origin);
  const int64_t heads = positive_int(c, "num_attention_heads", origin);
  const int64_t kv_heads = c.contains("num_key_value_heads") && !c["num_key_value_heads"].is_null()
                               ? positive_int(c, "num_key_value_heads", origin)
                               : heads;
  if (c.contains("head_dim") && !c["head_dim"].is_null() &&
      (hidden % heads != 0 || positive_int(c, "head_dim", origin) != hidden / heads)) {
    throw std::runtime_error(origin + ": field 'head_dim' is " + c["head_dim"].dump() +
                             "; Keel needs hidden_size / num_attention_heads");
  }
  if (c.contains("hidden_act") && c["hidden_act"] != "silu") {
    throw std::runtime_error(origin + ": field 'hidden_act' is " + c["hidden_act"].dump() +
                             "; Keel's MLP is SwiGLU (silu)");
  }
  for (const char* bias : {"attention_bias", "mlp_bias"}) {
    if (c.contains(bias) && c[bias] != false) {
      throw std::runtime_error(origin + ": field '" + std::string(bias) + "' is " + c[bias].dump() +
                               "; Keel's projections have no bias");
    }
  }
  const json tie = c.value("tie_word_embeddings", json(false));
  if (!tie.is_boolean())
    throw std::runtime_error(origin + ": field 'tie_word_embeddings' is " + tie.dump() + ", expected true or false");
  HfModelConfig out;
  read_rope(c, origin, out);
  out.max_position_embeddings = positive_int(c, "max_position_embeddings", origin);
  out.overrides = {
      "model.layers=" + std::to_string(positive_int(c, "num_hidden_layers", origin)),
      "model.d_model=" + std::to_string(hidden),
      "model.heads=" + std::to_string(heads),
      "model.kv_heads=" + std::to_string(kv_heads),
      "model.ffn_hidden=" + std::to_string(positive_int(c, "intermediate_size", origin)),
      "model.vocab=" + std::to_string(positive_int(c, "vocab_size", origin)),
      "model.seq_len=" + std::to_string(out.max_position_embeddings),
      "model.norm=rmsnorm",
      "model.norm_eps=" + json(positive_number(c, "rms_norm_eps", origin)).dump(),
      "model.rotary_fraction=1.0",
      "model.rope_theta=" + json(out.rope_theta).dump(),
      std::string("model.tie_embeddings=") + (tie.get<bool>() ? "true" : "false"),
      "model.qk_norm=false",
  };
  return out;
}

std::vector<std::string> keel_model_overrides_from_hf_config(const std::string& json_text, const std::string& origin) {
  return parse_hf_config(json_text, origin).overrides;
}

std::string hf_tokenizer_config_json(const std::string& eos_piece, const std::string& unk_piece, int64_t seq_len,
                                     const std::string& bos_piece, const std::string& pad_piece, bool add_bos) {
  auto piece_or_null = [](const std::string& piece) { return piece.empty() ? json(nullptr) : json(piece); };
  const json config = {
      {"tokenizer_class", "LlamaTokenizer"},
      {"add_bos_token", add_bos},
      {"add_eos_token", false},
      {"bos_token", piece_or_null(bos_piece)},
      {"eos_token", eos_piece},
      {"unk_token", unk_piece},
      {"pad_token", piece_or_null(pad_piece)},
      {"model_max_length", seq_len},
      {"clean_up_tokenization_spaces", false},
      {"legacy", false},
  };
  return config.dump(2) + "\n";
}

namespace {

// The tokenizer an export ships: the one the checkpoint's data was tokenized with, and its special ids and pieces
// (bos and pad -1 / "" when it has none).
struct ExportTokenizer {
  std::string model_path;
  std::string eos_piece, unk_piece, bos_piece, pad_piece;
  int64_t bos_id = -1, pad_id = -1;
};

// DATA_DIR/prepared.json's tokenizer, refused unless its fingerprint and EOS id are the ones the checkpoint's
// data fingerprint records (the data may have been re-prepared since).
ExportTokenizer find_export_tokenizer(const Config& config, const json& data_fingerprint, const std::string& origin) {
  const std::string hint = "; pass --no-tokenizer to export the weights alone";
  const std::string prepared_path = config.data.dir + "/prepared.json";
  if (!fs::exists(prepared_path)) {
    throw std::runtime_error(origin + ": its data dir has no prepared.json (" + prepared_path +
                             "), so its tokenizer cannot be exported" + hint);
  }
  const json prepared = json::parse(read_hf_text_file(prepared_path), nullptr, /*allow_exceptions=*/false);
  if (prepared.is_discarded() || !prepared.is_object() || !prepared.contains("tokenizer") ||
      !prepared["tokenizer"].is_object()) {
    throw std::runtime_error(prepared_path + ": not a JSON object with a 'tokenizer' object" + hint);
  }
  const json& tokenizer = prepared["tokenizer"];
  const json recorded = data_fingerprint.value("tokenizer", json());
  if (tokenizer.value("fingerprint", json()) != recorded) {
    throw std::runtime_error(prepared_path + ": tokenizer fingerprint " +
                             tokenizer.value("fingerprint", json()).dump() + ", but " + origin +
                             " was trained on data tokenized with " + recorded.dump() + hint);
  }
  ExportTokenizer out;
  out.model_path = config.data.dir + "/" + tokenizer.value("file", std::string(kTokenizerFile));
  io::require_regular_file<std::runtime_error>(out.model_path);
  const data::Tokenizer loaded(out.model_path);
  const json eos = data_fingerprint.value("eos_id", json());
  if (eos != json(loaded.eos_id())) {
    throw std::runtime_error(out.model_path + ": EOS id " + std::to_string(loaded.eos_id()) + ", but " + origin +
                             "'s data has EOS id " + eos.dump() + hint);
  }
  out.eos_piece = loaded.id_to_piece(loaded.eos_id());
  out.unk_piece = loaded.id_to_piece(data::kUnkId);
  out.bos_id = loaded.bos_id();
  out.pad_id = loaded.pad_id();
  if (out.bos_id >= 0) out.bos_piece = loaded.id_to_piece(static_cast<int32_t>(out.bos_id));
  if (out.pad_id >= 0) out.pad_piece = loaded.id_to_piece(static_cast<int32_t>(out.pad_id));
  return out;
}

// BOS and PAD ids of an export without a tokenizer (--no-tokenizer): those prepared.json records for the
// tokenizer the checkpoint's data was tokenized with (it records them for an external tokenizer or with
// data.add_bos), else none (-1): Keel's own tokenizers have neither.
std::pair<int64_t, int64_t> recorded_bos_pad(const Config& config, const json& data_fingerprint) {
  const std::string prepared_path = config.data.dir + "/prepared.json";
  std::error_code ec;
  if (!fs::is_regular_file(prepared_path, ec)) return {-1, -1};
  const json prepared = json::parse(read_hf_text_file(prepared_path), nullptr, /*allow_exceptions=*/false);
  if (prepared.is_discarded() || !prepared.is_object()) return {-1, -1};
  const json tokenizer = prepared.value("tokenizer", json::object());
  if (!tokenizer.is_object() || tokenizer.value("fingerprint", json()) != data_fingerprint.value("tokenizer", json()))
    return {-1, -1};
  auto id = [&](const char* key) {
    const json v = tokenizer.value(key, json());
    return v.is_number_integer() ? v.get<int64_t>() : int64_t{-1};
  };
  return {id("bos_id"), id("pad_id")};
}

}  // namespace

namespace {

constexpr int64_t kBf16ChunkElements = int64_t{1} << 16;  // a bf16 export converts 128 KiB at a time

// "model-00002-of-00005.safetensors", as Hugging Face names the files of a sharded checkpoint.
std::string shard_file_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

// Entries grouped into files of at most `max_bytes` each, in order (as transformers' save_pretrained: a tensor
// larger than the limit gets a file of its own).
std::vector<std::vector<size_t>> plan_shards(const std::vector<SafetensorsEntry>& entries, int64_t max_bytes) {
  std::vector<std::vector<size_t>> shards(1);
  uint64_t current = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint64_t bytes = entries[i].bytes();
    if (!shards.back().empty() && current + bytes > static_cast<uint64_t>(max_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(i);
    current += bytes;
  }
  return shards;
}

// Writes `sources` (placeholders; `entries` names them) into OUT_DIR, one tensor in memory at a time; returns
// the weight files' names (one: model.safetensors; several: the shards, then the index).
std::vector<std::string> write_hf_weights(const std::vector<at::Tensor>& sources, const std::string& out_dir,
                                          const std::map<std::string, std::string>& metadata,
                                          const std::vector<SafetensorsEntry>& entries, const ExportOptions& options) {
  const std::vector<std::vector<size_t>> shards = plan_shards(entries, options.max_shard_bytes);
  std::vector<std::string> files;
  json weight_map = json::object();
  uint64_t total = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? kWeightsFile : shard_file_name(s, shards.size());
    std::vector<SafetensorsEntry> in_file;
    for (size_t i : shards[s]) {
      in_file.push_back(entries[i]);
      weight_map[entries[i].name] = file;
      total += entries[i].bytes();
    }
    write_safetensors_streaming(
        out_dir + "/" + file, metadata, in_file, [&](size_t k, const std::function<void(const char*, size_t)>& write) {
          const torch::Tensor t = checkpoint::materialize(sources[shards[s][k]]).contiguous();  // [global] fp32
          if (!options.bf16) {
            write(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.nbytes()));
            return;
          }
          // Rounded to bf16 (to nearest even, as torch's .to()) a chunk at a time: no second copy of the tensor.
          const torch::Tensor flat = t.view({-1});  // [numel]
          for (int64_t begin = 0; begin < flat.numel(); begin += kBf16ChunkElements) {
            const torch::Tensor chunk =
                flat.narrow(0, begin, std::min(kBf16ChunkElements, flat.numel() - begin)).to(torch::kBFloat16);
            write(static_cast<const char*>(chunk.data_ptr()), static_cast<size_t>(chunk.nbytes()));
          }
        });
    files.push_back(file);
  }
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    checkpoint::write_file_atomically(out_dir + "/" + kIndexFile, index.dump(2) + "\n");
    files.push_back(kIndexFile);
  }
  return files;
}

}  // namespace

int64_t parse_shard_size(const std::string& text, const std::string& origin) {
  // transformers' convert_file_size_to_int: GB/MB/KB are powers of 10, GiB/MiB/KiB powers of 2.
  static const std::vector<std::pair<std::string, int64_t>> units = {{"GiB", int64_t{1} << 30},
                                                                     {"MiB", int64_t{1} << 20},
                                                                     {"KiB", int64_t{1} << 10},
                                                                     {"GB", 1000000000},
                                                                     {"MB", 1000000},
                                                                     {"KB", 1000},
                                                                     {"B", 1},
                                                                     {"", 1}};
  std::string upper = text;  // "5gb" as "5GB", as transformers reads it
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (auto [unit, scale] : units) {
    for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (upper.size() <= unit.size() || upper.compare(upper.size() - unit.size(), unit.size(), unit) != 0) continue;
    const std::string number = upper.substr(0, upper.size() - unit.size());
    if (number.size() > 18 || number.find_first_not_of("0123456789") != std::string::npos) break;
    const unsigned long long value = std::stoull(number);
    if (value == 0 || value > static_cast<unsigned long long>(std::numeric_limits<int64_t>::max() / scale)) break;
    return static_cast<int64_t>(value) * scale;
  }
  throw std::runtime_error(origin + " is '" + text +
                           "', expected a positive size in bytes, optionally with KB, MB, GB (powers of 10) or KiB, "
                           "MiB, GiB (e.g. 5GB)");
}

std::string export_hf(const std::string& checkpoint_dir, const std::string& out_dir, const ExportOptions& options) {
  // 1. Everything checked and mapped (names, shapes, dtypes) before OUT_DIR gets a file; tensor bytes are read
  // one tensor at a time while writing (checkpoint::read_lazy_state), so the export never holds the model.
  refuse_non_empty_dir(out_dir, "output directory");
  if (options.max_shard_bytes <= 0) throw std::runtime_error("--max-shard-size must be positive");
  const checkpoint::Manifest manifest = checkpoint::verify_checkpoint_dir(checkpoint_dir);
  const std::string config_path = checkpoint_dir + "/config.ini";
  const Config config = load_config(config_path);
  check_hf_expressible(config.model, config_path);
  const json data_fingerprint = json::parse(manifest.data_fingerprint, nullptr, /*allow_exceptions=*/false);
  if (data_fingerprint.is_discarded() || !data_fingerprint.is_object() || !data_fingerprint.contains("eos_id") ||
      !data_fingerprint["eos_id"].is_number_integer()) {
    throw std::runtime_error(checkpoint_dir + ": manifest field 'data_fingerprint' has no integer eos_id");
  }
  const int64_t eos_id = data_fingerprint["eos_id"].get<int64_t>();
  std::optional<ExportTokenizer> tokenizer;
  if (options.tokenizer) tokenizer = find_export_tokenizer(config, data_fingerprint, checkpoint_dir);
  const auto [bos_id, pad_id] =
      tokenizer ? std::make_pair(tokenizer->bos_id, tokenizer->pad_id) : recorded_bos_pad(config, data_fingerprint);
  const checkpoint::TrainingState state = checkpoint::read_lazy_state(checkpoint_dir, manifest, /*rng_rank=*/-1);
  const SafetensorsDtype dtype = options.bf16 ? SafetensorsDtype::kBF16 : SafetensorsDtype::kF32;
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"keel_checkpoint", checkpoint_dir},
                                                       {"keel_step", std::to_string(manifest.step)},
                                                       {"keel_run_id", manifest.run_id}};
  // The model's own order (embedding, blocks, final norm, head), whatever order the rank files list them in.
  std::map<std::string, size_t> model_order;
  for (const ParameterTensor& p : parameter_tensors(config.model)) model_order.emplace(p.name, model_order.size());
  std::vector<size_t> order(state.model.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto rank_of = [&](size_t i) {
    const auto it = model_order.find(state.model[i].first);
    return it == model_order.end() ? model_order.size() : it->second;
  };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rank_of(a) < rank_of(b); });
  std::vector<SafetensorsEntry> entries;
  std::vector<at::Tensor> sources;  // placeholders, in the order of `entries`
  for (size_t i : order) {
    const auto& [name, tensor] = state.model[i];
    if (tensor.scalar_type() != torch::kFloat) {
      throw std::runtime_error(checkpoint_dir + ": tensor '" + name + "' is " + c10::toString(tensor.scalar_type()) +
                               ", expected fp32 masters");
    }
    entries.push_back({hf_name_of(name), dtype, tensor.sizes().vec()});
    sources.push_back(tensor);
  }
  // 2. The files, each atomically; config.json last (a directory with config.json is complete). A failure
  // removes what this export wrote.
  const bool created = !fs::exists(out_dir);
  fs::create_directories(out_dir);
  std::vector<std::string> files;
  try {
    files = write_hf_weights(sources, out_dir, metadata, entries, options);
    if (tokenizer) {
      checkpoint::write_file_atomically(out_dir + "/" + kTokenizerFile,
                                        checkpoint::read_small_file(tokenizer->model_path));
      checkpoint::write_file_atomically(
          out_dir + "/" + kTokenizerConfigFile,
          hf_tokenizer_config_json(tokenizer->eos_piece, tokenizer->unk_piece, config.model.seq_len,
                                   tokenizer->bos_piece, tokenizer->pad_piece, config.data.add_bos));
    }
    checkpoint::write_file_atomically(
        out_dir + "/" + kHfConfigFile,
        hf_config_json(config.model, options.bf16 ? "bfloat16" : "float32", eos_id, bos_id, pad_id));
  } catch (...) {
    std::error_code ec;
    if (created) {
      fs::remove_all(out_dir, ec);
    } else {
      for (const auto& entry : fs::directory_iterator(out_dir, ec)) fs::remove(entry.path(), ec);
    }
    throw;
  }
  const std::string weights = files.size() == 1
                                  ? ""
                                  : "; " + std::to_string(files.size() - 1) + " files of at most " +
                                        std::to_string(options.max_shard_bytes) + " bytes + " + kIndexFile;
  return "exported " + std::to_string(entries.size()) + " tensors of " + checkpoint_dir + " (step " +
         std::to_string(manifest.step) + ") to " + out_dir + " as LlamaForCausalLM (" +
         (options.bf16 ? "bfloat16" : "float32") + "; eos_token_id " + std::to_string(eos_id) + ", " +
         (bos_id >= 0 ? "bos_token_id " + std::to_string(bos_id) : std::string("no BOS")) +
         (config.data.add_bos ? " (added before every document)" : "") + ", " +
         (pad_id >= 0 ? "pad_token_id " + std::to_string(pad_id) : std::string("no pad")) + "; " +
         (tokenizer ? "tokenizer " + tokenizer->model_path + " with tokenizer_config.json" : "no tokenizer") + weights +
         ")";
}

namespace {

// Every HF tensor matched to a Keel parameter of `config` by name and shape, from the files' headers alone (no
// tensor's bytes are read, except lm_head.weight and the embedding of a tied checkpoint that stores both, which
// must be equal). Keel names and their HF tensors, in model order.
std::vector<std::pair<std::string, HfTensor>> match_hf_weights(const std::string& hf_dir, const Config& config) {
  const std::map<std::string, HfTensor> hf = read_hf_weights(hf_dir);
  std::vector<std::pair<std::string, HfTensor>> matched;  // Keel name, its HF tensor
  std::set<std::string> used;
  for (const ParameterTensor& p : parameter_tensors(config.model)) {  // the names, order and shapes Keel expects
    const std::string hf_name = hf_name_of(p.name);
    const auto it = hf.find(hf_name);
    if (it == hf.end())
      throw std::runtime_error(hf_dir + ": tensor '" + hf_name + "' (Keel '" + p.name + "') is missing");
    if (it->second.entry.shape != p.global_shape) {
      throw std::runtime_error(hf_dir + ": tensor '" + hf_name + "' has shape " +
                               c10::str(at::IntArrayRef(it->second.entry.shape)) + ", the model in config.json needs " +
                               c10::str(at::IntArrayRef(p.global_shape)));
    }
    matched.emplace_back(p.name, it->second);
    used.insert(hf_name);
  }
  const HfTensor* tied_head = nullptr;
  for (const auto& [name, tensor] : hf) {
    if (used.count(name)) continue;
    // Older HF checkpoints store the RoPE table ("model.layers.N.self_attn.rotary_emb.inv_freq"); it is
    // recomputed from rope_theta.
    if (ends_with(name, std::string(".") + kRotaryBuffer)) continue;
    if (name == "lm_head.weight" && config.model.tie_embeddings) {
      tied_head = &tensor;
      continue;
    }
    throw std::runtime_error(hf_dir + ": tensor '" + name + "' has no place in Keel's decoder");
  }
  if (tied_head && !torch::equal(to_fp32(*tied_head), to_fp32(matched.front().second))) {
    throw std::runtime_error(hf_dir +
                             ": tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight");
  }
  return matched;
}

// HF_DIR/tokenizer.model, when present: recorded in `plan`, refused when it has more pieces than model.vocab or
// is not the prepared data's tokenizer (unless allowed). Absent: said so.
void check_hf_tokenizer(ImportPlan& plan, const ImportOptions& options) {
  const std::string path = plan.hf_dir + "/" + kTokenizerFile;
  const std::string prepared = plan.config.data.dir + "/" + kTokenizerFile;
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    plan.notes.push_back("no " + std::string(kTokenizerFile) + " in " + plan.hf_dir +
                         ": the prepared data's tokenizer (" + prepared + ") is taken to match the weights");
    return;
  }
  io::require_regular_file<std::runtime_error>(path);
  const data::Tokenizer tokenizer(path);
  plan.tokenizer_path = path;
  plan.tokenizer_pieces = tokenizer.vocab_size();
  plan.tokenizer_sha256 = checkpoint::sha256_file(path);
  const int64_t vocab = plan.config.model.vocab;
  if (plan.tokenizer_pieces > vocab) {
    throw std::runtime_error(path + ": " + std::to_string(plan.tokenizer_pieces) +
                             " pieces, but the model's vocab_size (model.vocab) is " + std::to_string(vocab));
  }
  const std::string prepared_sha = fs::exists(prepared, ec) ? checkpoint::sha256_file(prepared) : "(missing)";
  std::string line = "tokenizer " + path + " (sha256 " + plan.tokenizer_sha256 + ", " +
                     std::to_string(plan.tokenizer_pieces) + " pieces, EOS id " + std::to_string(tokenizer.eos_id()) +
                     ")";
  if (plan.tokenizer_pieces < vocab)
    line += "; model.vocab " + std::to_string(vocab) + ": the last " + std::to_string(vocab - plan.tokenizer_pieces) +
            " embedding rows are padding";
  if (!options.check_data) {
    line += "; not compared with the prepared data's tokenizer (dry run)";
  } else if (prepared_sha != plan.tokenizer_sha256) {
    const std::string mismatch = path + " (sha256 " + plan.tokenizer_sha256 + ") is not the tokenizer the data in " +
                                 plan.config.data.dir + " was prepared with (" + prepared + ", sha256 " + prepared_sha +
                                 ")";
    if (!options.allow_tokenizer_change)
      throw std::runtime_error(mismatch + ": prepare the data with it, or pass --allow-tokenizer-change");
    line += "; " + mismatch + " (allowed: --allow-tokenizer-change)";
  } else {
    line += "; the same file as the prepared data's";
  }
  plan.notes.push_back(line);
}

}  // namespace

ImportPlan plan_import(const std::string& hf_dir, const ImportOptions& options) {
  // 1. Config: model.* from config.json, the rest from --config, then --set.
  ImportPlan plan;
  plan.hf_dir = hf_dir;
  const std::string hf_config_path = hf_dir + "/" + kHfConfigFile;
  const HfModelConfig hf = parse_hf_config(read_hf_text_file(hf_config_path), hf_config_path);
  std::vector<std::string> overrides = hf.overrides;
  overrides.insert(overrides.end(), options.overrides.begin(), options.overrides.end());
  plan.config = load_config(options.config_path, overrides);
  check_hf_expressible(plan.config.model, "the imported config");
  plan.max_position_embeddings = hf.max_position_embeddings;
  const int64_t seq_len = plan.config.model.seq_len;
  plan.notes.push_back(
      "max_position_embeddings " + std::to_string(hf.max_position_embeddings) +
      " (config.json); training sequence length model.seq_len " + std::to_string(seq_len) +
      (seq_len == hf.max_position_embeddings ? " (the same; --set model.seq_len=N to train shorter)"
       : seq_len > hf.max_position_embeddings
           ? " (longer: positions beyond " + std::to_string(hf.max_position_embeddings) + " were never trained)"
           : " (shorter, set by --config/--set)"));
  plan.notes.push_back("rope_theta " + json(plan.config.model.rope_theta).dump() + " (" + hf.rope_theta_from + ")");

  // 2. Every HF tensor matched to a Keel parameter by name and shape; read and converted to fp32 one at a time
  // when written (write_import).
  auto matched =
      std::make_shared<const std::vector<std::pair<std::string, HfTensor>>>(match_hf_weights(hf_dir, plan.config));
  std::set<std::string> files;
  for (const auto& [name, tensor] : *matched) {
    plan.weights.emplace_back(
        name, at::empty(tensor.entry.shape,
                        at::TensorOptions().dtype(at::kFloat).device(at::kMeta)));  // [as the model], no data
    plan.parameters += tensor.entry.numel();
    plan.source_bytes += static_cast<int64_t>(tensor.entry.bytes());
    plan.largest_tensor_elements = std::max(plan.largest_tensor_elements, tensor.entry.numel());
    files.insert(tensor.file->path);
  }
  plan.weight_files = static_cast<int64_t>(files.size());
  plan.read_weight = [matched](size_t i) { return to_fp32(matched->at(i).second); };

  // 3. The data this run will train on (its ledger at step 0 and fingerprint), and the HF tokenizer against it.
  if (options.check_data) {
    data::DataLoader loader(plan.config, plan.config.global_batch());
    plan.data_ledger = loader.state().dump();
    plan.data_fingerprint = loader.fingerprint().dump();
  } else {
    plan.notes.push_back("the data (" + plan.config.data.dir + ") is not checked by a dry run");
  }
  check_hf_tokenizer(plan, options);
  return plan;
}

namespace {

// The fresh state of the config's optimizer plugin, by its own names, without holding it: the plugin bound to
// placeholders of the weights (meta tensors: shapes only; matrices decay, as in the trainer) gives the JSON and
// every state tensor's name, shape and dtype; `read(i)` makes tensor i by binding a new instance of the plugin
// to the one weight it belongs to (read from HF_DIR) and asking for its state. This needs a state that is per
// parameter (AdamW, Lion, Muon: moments of each parameter's shape); anything else is refused naming the plugin.
struct FreshOptimizer {
  std::string name, json;
  checkpoint::NamedTensors tensors;  // placeholders (meta), in the plugin's order
  checkpoint::TensorSource read;
};

FreshOptimizer fresh_optimizer_state(const ImportPlan& plan) {
  std::vector<plugin_host::LoadedPlugin> loaded = plugin_host::PluginHost::load_slot("optimizer", plan.config);
  if (loaded.size() != 1) throw std::runtime_error("plugins.optimizer must name exactly one optimizer plugin");
  auto plugin = std::make_shared<plugin_host::LoadedPlugin>(std::move(loaded.front()));
  const std::string refused = "plugins.optimizer = " + plugin->name() + ": ";
  std::vector<sdk::Param> params;
  std::vector<std::string> weight_names;
  std::map<std::string, size_t> weight_index;
  for (const auto& [name, w] : plan.weights) {
    params.push_back({name, w, w.dim() >= 2});
    weight_index.emplace(name, weight_names.size());
    weight_names.push_back(name);
  }
  sdk::PluginState meta;
  try {
    plugin->object->bind(params);
    meta = plugin->object->save_state();
  } catch (const std::exception& e) {
    throw std::runtime_error(refused + "cannot be bound to shape-only (meta) placeholders of the weights, which " +
                             "import-hf streams one at a time: " + e.what());
  }
  FreshOptimizer out;
  out.name = plugin->name();
  out.json = meta.json;
  // Which weight each state tensor belongs to ("<param>/<state>"), and its place among that weight's tensors.
  std::vector<std::pair<size_t, size_t>> owner;
  std::vector<std::string> names;
  std::vector<size_t> seen(plan.weights.size(), 0);
  for (const auto& [name, t] : meta.tensors) {
    const auto slash = name.rfind('/');
    const auto it = slash == std::string::npos ? weight_index.end() : weight_index.find(name.substr(0, slash));
    if (it == weight_index.end() || !t.defined()) {
      throw std::runtime_error(refused + "its fresh state tensor '" + name +
                               "' is not a per-parameter '<param>/<state>' tensor; import-hf streams one parameter " +
                               "at a time and cannot make it");
    }
    owner.emplace_back(it->second, seen[it->second]++);
    names.push_back(name);
    out.tensors.emplace_back(name, at::empty(t.sizes(), t.options().device(at::kMeta)));  // [its shape], no data
  }
  // One instance per weight, bound to it alone, kept until that weight's last state tensor is written.
  auto current = std::make_shared<std::pair<size_t, sdk::PluginState>>(SIZE_MAX, sdk::PluginState{});
  out.read = [plugin, refused, owner, names, weight_names, current, config = plan.config,
              read_weight = plan.read_weight](size_t i) {
    const auto [weight, k] = owner.at(i);
    if (current->first != weight) {
      current->second = sdk::PluginState{};  // the previous weight's state goes first
      const at::Tensor w = read_weight(weight);
      const std::shared_ptr<sdk::Plugin> fresh =
          plugin->library->create(plugin_host::plugin_args(config, plugin->name()));
      fresh->bind({{weight_names[weight], w, w.dim() >= 2}});
      current->second = fresh->save_state();
      current->first = weight;
    }
    checkpoint::NamedTensors& own = current->second.tensors;
    if (k >= own.size() || own[k].first != names[i]) {
      throw std::runtime_error(refused + "bound to '" + weight_names[weight] + "' alone, its fresh state lacks '" +
                               names[i] + "' that it has when bound to every weight; import-hf needs a " +
                               "per-parameter state");
    }
    return std::move(own[k].second);  // dropped once written
  };
  return out;
}

}  // namespace

std::string write_import(const ImportPlan& plan, const ImportTarget& target) {
  const Config& config = plan.config;
  checkpoint::Lineage lineage;
  lineage.run_id = checkpoint::new_run_id();
  lineage.run_dir = target.run_dir;
  lineage.created = io::utc_now_iso8601();
  lineage.parent_run_id = "huggingface";
  lineage.parent_run_dir = plan.hf_dir;
  lineage.parent_checkpoint = plan.hf_dir;
  lineage.parent_step = 0;
  lineage.notes.push_back("imported from Hugging Face LlamaForCausalLM " + plan.hf_dir + " (weights as fp32 masters, " +
                          "fresh " + config.plugins.optimizer + " state)");
  lineage.notes.insert(lineage.notes.end(), plan.notes.begin(), plan.notes.end());
  const std::string lineage_json = checkpoint::lineage_to_json(lineage);
  const std::string config_ini = to_ini(config);
  checkpoint::write_file_atomically(target.config_ini, config_ini);
  checkpoint::write_file_atomically(target.lineage_json, lineage_json);

  const FreshOptimizer optimizer = fresh_optimizer_state(plan);
  checkpoint::TrainingState state;
  state.model = plan.weights;  // placeholders: the writer asks plan.read_weight for each in turn
  state.optimizer_name = optimizer.name;
  state.optimizer_json = optimizer.json;
  state.optimizer_step = sdk::json_int(optimizer.json, "step", 0);
  state.optimizer = optimizer.tensors;  // placeholders: optimizer.read(i) makes each in turn
  state.lr_schedule = checkpoint::lr_schedule_json(config, /*next_step=*/0, /*lr_factor=*/1.0, /*lr_factor_until=*/-1);
  state.data_ledger = plan.data_ledger;
  state.config_ini = config_ini;
  state.lineage = lineage_json;
  checkpoint::CheckpointStore store(target.checkpoints);
  const checkpoint::Manifest manifest = checkpoint::run_manifest(config, config_ini, lineage.run_id, lineage.created,
                                                                 {1, 1, 1}, plan.data_fingerprint, lineage_json);
  return checkpoint::write_streamed_checkpoint(store, 0, state, manifest, plan.read_weight, optimizer.read);
}

}  // namespace keel::interop

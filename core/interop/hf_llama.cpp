// Why: the Keel <-> Hugging Face LlamaForCausalLM mapping (names, config.json) and the two conversions built
// on it (see hf_llama.h for the contract). Both directions check everything before they write anything: an
// export reads and maps every tensor before OUT_DIR gets a file, an import matches every HF tensor to a Keel
// parameter (name, shape) before the run dir is claimed.
#include "core/interop/hf_llama.h"

#include <torch/torch.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <stdexcept>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/lineage.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/checkpoint/sha256.h"
#include "core/checkpoint/training_state.h"
#include "core/data/loader.h"
#include "core/data/regular_file.h"
#include "core/interop/safetensors.h"
#include "core/metrics/hdf5_handle.h"
#include "core/model/llama.h"
#include "core/train/run_dir.h"

namespace keel::interop {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kWeightsFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kHfConfigFile = "config.json";

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

// An fp32 tensor as safetensors bytes in `dtype` (bf16 rounds to nearest even, as torch's .to() does).
SafetensorsTensor to_safetensors(const std::string& name, const torch::Tensor& fp32, SafetensorsDtype dtype) {
  const torch::Tensor t =
      fp32.to(torch::kCPU).to(dtype == SafetensorsDtype::kBF16 ? torch::kBFloat16 : torch::kFloat).contiguous();
  SafetensorsTensor out;
  out.name = name;
  out.dtype = dtype;
  out.shape = t.sizes().vec();
  out.bytes.assign(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.nbytes()));
  return out;
}

// Safetensors bytes -> an owned fp32 tensor (F16/BF16 widened exactly).
torch::Tensor to_fp32(const SafetensorsTensor& t) {
  const torch::ScalarType type = t.dtype == SafetensorsDtype::kF32   ? torch::kFloat
                                 : t.dtype == SafetensorsDtype::kF16 ? torch::kHalf
                                                                     : torch::kBFloat16;
  torch::Tensor view = torch::from_blob(const_cast<char*>(t.bytes.data()), t.shape, torch::TensorOptions().dtype(type));
  return view.to(torch::kFloat).clone();
}

// A small text file of an HF directory (config.json, the index): a FIFO, a directory or a device in its place is
// refused by name before it is opened (a FIFO would block the read forever).
std::string read_hf_text_file(const std::string& path) {
  data::require_regular_file<std::runtime_error>(path);
  return checkpoint::read_small_file(path);
}

// Every tensor of HF_DIR by name: model.safetensors, or the shards model.safetensors.index.json lists.
std::map<std::string, SafetensorsTensor> read_hf_weights(const std::string& hf_dir) {
  std::map<std::string, SafetensorsTensor> tensors;
  const std::string single = hf_dir + "/" + kWeightsFile, index_path = hf_dir + "/" + kIndexFile;
  if (fs::exists(single)) {
    for (auto& t : read_safetensors(single).tensors) tensors.emplace(t.name, std::move(t));
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
    for (auto& t : read_safetensors(path).tensors) {
      if (!names.count(t.name))
        throw std::runtime_error(path + ": tensor '" + t.name + "' is not listed for this file in " + index_path);
      if (tensors.count(t.name))
        throw std::runtime_error(path + ": tensor '" + t.name + "' appears in more than one shard");
      tensors.emplace(t.name, std::move(t));
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

double positive_number(const json& config, const char* name, const std::string& origin) {
  const json& v = field(config, name, origin);
  if (!v.is_number() || v.get<double>() <= 0) {
    throw std::runtime_error(origin + ": field '" + std::string(name) + "' is " + v.dump() +
                             ", expected a positive number");
  }
  return v.get<double>();
}

}  // namespace

void check_hf_expressible(const ModelConfig& model, const std::string& origin) {
  const std::string tail = ": Hugging Face LlamaForCausalLM cannot express this model";
  if (model.norm != "rmsnorm")
    throw std::runtime_error(origin + ": model.norm = " + model.norm + tail + " (it uses RMSNorm)");
  if (model.rotary_fraction != 1.0) {
    throw std::runtime_error(origin + ": model.rotary_fraction = " + std::to_string(model.rotary_fraction) + tail +
                             " (it rotates every head dimension)");
  }
  if (model.qk_norm) throw std::runtime_error(origin + ": model.qk_norm = true" + tail + " (it has no QK-norm)");
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

std::string hf_config_json(const ModelConfig& model, const std::string& torch_dtype) {
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
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", model.tie_embeddings},
      {"torch_dtype", torch_dtype},
  };
  return config.dump(2) + "\n";
}

std::vector<std::string> keel_model_overrides_from_hf_config(const std::string& json_text, const std::string& origin) {
  const json c = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (c.is_discarded() || !c.is_object()) throw std::runtime_error(origin + ": not a JSON object");
  bool llama = c.value("model_type", json()) == "llama";
  if (c.contains("architectures") && c["architectures"].is_array()) {
    for (const json& a : c["architectures"]) llama = llama || a == "LlamaForCausalLM";
  }
  if (!llama)
    throw std::runtime_error(origin + ": field 'architectures' / 'model_type': not a LlamaForCausalLM / llama model");
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
  if (c.contains("rope_scaling") && !c["rope_scaling"].is_null()) {
    throw std::runtime_error(origin + ": field 'rope_scaling' is " + c["rope_scaling"].dump() +
                             "; Keel has plain RoPE only");
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
  const double theta = c.contains("rope_theta") ? positive_number(c, "rope_theta", origin) : 10000.0;
  return {
      "model.layers=" + std::to_string(positive_int(c, "num_hidden_layers", origin)),
      "model.d_model=" + std::to_string(hidden),
      "model.heads=" + std::to_string(heads),
      "model.kv_heads=" + std::to_string(kv_heads),
      "model.ffn_hidden=" + std::to_string(positive_int(c, "intermediate_size", origin)),
      "model.vocab=" + std::to_string(positive_int(c, "vocab_size", origin)),
      "model.seq_len=" + std::to_string(positive_int(c, "max_position_embeddings", origin)),
      "model.norm=rmsnorm",
      "model.norm_eps=" + json(positive_number(c, "rms_norm_eps", origin)).dump(),
      "model.rotary_fraction=1.0",
      "model.rope_theta=" + json(theta).dump(),
      std::string("model.tie_embeddings=") + (tie.get<bool>() ? "true" : "false"),
      "model.qk_norm=false",
  };
}

std::string export_hf(const std::string& checkpoint_dir, const std::string& out_dir, const ExportOptions& options) {
  // 1. Everything read, checked and mapped before OUT_DIR gets a file.
  refuse_non_empty_dir(out_dir, "output directory");
  const checkpoint::Manifest manifest = checkpoint::verify_checkpoint_dir(checkpoint_dir);
  const std::string config_path = checkpoint_dir + "/config.ini";
  const Config config = load_config(config_path);
  check_hf_expressible(config.model, config_path);
  const checkpoint::TrainingState state = checkpoint::read_full_state(checkpoint_dir, manifest, /*rng_rank=*/-1);
  const SafetensorsDtype dtype = options.bf16 ? SafetensorsDtype::kBF16 : SafetensorsDtype::kF32;
  SafetensorsFile file;
  file.metadata = {{"format", "pt"},
                   {"keel_checkpoint", checkpoint_dir},
                   {"keel_step", std::to_string(manifest.step)},
                   {"keel_run_id", manifest.run_id}};
  for (const auto& [name, tensor] : state.model) {
    if (tensor.scalar_type() != torch::kFloat) {
      throw std::runtime_error(checkpoint_dir + ": tensor '" + name + "' is " + c10::toString(tensor.scalar_type()) +
                               ", expected fp32 masters");
    }
    file.tensors.push_back(to_safetensors(hf_name_of(name), tensor, dtype));
  }
  // 2. The files, each atomically; config.json last (a directory with config.json is complete).
  fs::create_directories(out_dir);
  checkpoint::write_file_atomically(out_dir + "/" + kWeightsFile, serialize_safetensors(file));
  checkpoint::write_file_atomically(out_dir + "/" + kHfConfigFile,
                                    hf_config_json(config.model, options.bf16 ? "bfloat16" : "float32"));
  return "exported " + std::to_string(file.tensors.size()) + " tensors of " + checkpoint_dir + " (step " +
         std::to_string(manifest.step) + ") to " + out_dir + " as LlamaForCausalLM (" +
         (options.bf16 ? "bfloat16" : "float32") + ")";
}

std::string import_hf(const std::string& hf_dir, const std::string& run_dir, const ImportOptions& options) {
  // 1. Config: model.* from config.json, the rest from --config, then --set.
  const std::string hf_config_path = hf_dir + "/" + kHfConfigFile;
  std::vector<std::string> overrides =
      keel_model_overrides_from_hf_config(read_hf_text_file(hf_config_path), hf_config_path);
  overrides.insert(overrides.end(), options.overrides.begin(), options.overrides.end());
  const Config config = load_config(options.config_path, overrides);
  check_hf_expressible(config.model, "the imported config");

  // 2. Every HF tensor matched to a Keel parameter by name and shape, converted to fp32.
  std::map<std::string, SafetensorsTensor> hf = read_hf_weights(hf_dir);
  const model::Llama model(config.model);  // the parameter names, order and shapes Keel expects
  checkpoint::NamedTensors weights;
  std::set<std::string> used;
  for (const auto& item : model->named_parameters()) {
    const std::string hf_name = hf_name_of(item.key());
    const auto it = hf.find(hf_name);
    if (it == hf.end())
      throw std::runtime_error(hf_dir + ": tensor '" + hf_name + "' (Keel '" + item.key() + "') is missing");
    if (it->second.shape != item.value().sizes().vec()) {
      throw std::runtime_error(hf_dir + ": tensor '" + hf_name + "' has shape " +
                               c10::str(at::IntArrayRef(it->second.shape)) + ", the model in config.json needs " +
                               c10::str(item.value().sizes()));
    }
    weights.emplace_back(item.key(), to_fp32(it->second));
    used.insert(hf_name);
  }
  for (const auto& [name, tensor] : hf) {
    if (used.count(name)) continue;
    // Older HF checkpoints store the RoPE table; it is recomputed from rope_theta.
    if (name.size() > 21 && name.compare(name.size() - 21, 21, "rotary_emb.inv_freq") == 0) continue;
    if (name == "lm_head.weight" && config.model.tie_embeddings) {
      if (!torch::equal(to_fp32(tensor), weights.front().second)) {
        throw std::runtime_error(
            hf_dir + ": tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight");
      }
      continue;
    }
    throw std::runtime_error(hf_dir + ": tensor '" + name + "' has no place in Keel's decoder");
  }

  // 3. The data this run will train on (its ledger at step 0 and fingerprint), before the run dir is claimed.
  data::DataLoader loader(config, config.global_batch());
  refuse_non_empty_dir(run_dir, "--run-dir");
  const train::RunDirClaim claim = train::create_run_dir(run_dir, /*force=*/false);  // locked until the import ends
  const train::RunPaths& paths = claim.paths;

  checkpoint::Lineage lineage;
  lineage.run_id = checkpoint::new_run_id();
  lineage.run_dir = run_dir;
  lineage.created = metrics::detail::utc_now_iso8601();
  lineage.parent_run_id = "huggingface";
  lineage.parent_run_dir = hf_dir;
  lineage.parent_checkpoint = hf_dir;
  lineage.parent_step = 0;
  lineage.notes.push_back("imported from Hugging Face LlamaForCausalLM " + hf_dir +
                          " (weights as fp32 masters, fresh optimizer)");
  const std::string lineage_json = checkpoint::lineage_to_json(lineage);
  const std::string config_ini = to_ini(config);
  checkpoint::write_file_atomically(paths.config_ini(), config_ini);
  checkpoint::write_file_atomically(paths.lineage_json(), lineage_json);

  // 4. One checkpoint at step 0, written like Trainer::save_checkpoint writes one (layout 1 x 1 x 1: whole tensors).
  checkpoint::TrainingState state;
  state.model = weights;
  state.optimizer_name = "adamw";  // zero moments and step 0 are a fresh AdamW; another optimizer adopts them
  state.optimizer_json = "{\"step\": 0}";
  for (const auto& [name, w] : weights) {
    state.optimizer.emplace_back(name + "/exp_avg", torch::zeros_like(w));
    state.optimizer.emplace_back(name + "/exp_avg_sq", torch::zeros_like(w));
  }
  state.lr_schedule = json{{"kind", "warmup_cosine"},
                           {"lr", config.optim.lr},
                           {"min_lr", config.optim.min_lr},
                           {"warmup_steps", config.optim.warmup_steps},
                           {"decay_steps", config.lr_decay_steps()},
                           {"next_step", 0},
                           {"lr_factor", 1.0},
                           {"lr_factor_until", -1},
                           {"lr_schedule_plugin", config.plugins.lr_schedule}}
                          .dump();
  state.data_ledger = loader.state().dump();
  state.config_ini = config_ini;
  state.lineage = lineage_json;

  checkpoint::CheckpointStore store(paths.checkpoints());
  const std::string tmp = store.begin(0);
  checkpoint::write_rank_file(tmp + "/" + checkpoint::rank_file_name(0), state, {0, 1});
  checkpoint::write_file_atomically(tmp + "/config.ini", config_ini);
  checkpoint::Manifest manifest;
  manifest.keel_version = KEEL_VERSION;
  manifest.created = lineage.created;
  manifest.run_id = lineage.run_id;
  manifest.layout = {1, 1, 1};
  manifest.config_hash = checkpoint::sha256_hex(config_ini);
  for (const auto& [key, value] : flatten(config)) {
    if (key.rfind("model.", 0) == 0) manifest.model[key] = value;
  }
  manifest.data_fingerprint = loader.fingerprint().dump();
  manifest.lineage = lineage_json;
  return store.commit(0, manifest, {{checkpoint::rank_file_name(0), 0}, {"config.ini", -1}});
}

}  // namespace keel::interop

// Why: what an HF config.json says about RoPE must reach Keel exactly or be refused by name: transformers 5
// writes rope_parameters (no top-level rope_theta), older files rope_theta; anything but plain RoPE
// (another rope_type, partial_rotary_factor) would make the imported model compute something else. And the
// files an export writes must carry Keel's special tokens (EOS id 1, no BOS, no pad), or HF's generate() stops
// on the wrong token. Architectures near LLaMA are refused saying what Keel does not compute; Amber-7B's config.json
// maps to its model keys.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "core/interop/hf_llama.h"

using keel::interop::hf_config_json;
using keel::interop::hf_tokenizer_config_json;
using keel::interop::HfModelConfig;
using keel::interop::parse_hf_config;

namespace {

// A minimal LLaMA config.json with `extra` fields added (a JSON object's members, without braces).
std::string llama_config(const std::string& extra) {
  return R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "intermediate_size": 176, "vocab_size": 2048, "max_position_embeddings": 128, "rms_norm_eps": 1e-5)" +
         (extra.empty() ? "" : ", " + extra) + "}";
}

bool has(const HfModelConfig& c, const std::string& override_line) {
  return std::find(c.overrides.begin(), c.overrides.end(), override_line) != c.overrides.end();
}

// The message parse_hf_config throws, or "(accepted)".
std::string refusal(const std::string& json_text) {
  try {
    parse_hf_config(json_text, "hf/config.json");
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(accepted)";
}

}  // namespace

TEST(HfConfig, RopeThetaComesFromRopeParametersOrTheTopLevelOrTheDefault) {
  const HfModelConfig v5 = parse_hf_config(
      llama_config(R"("rope_parameters": {"rope_type": "default", "rope_theta": 500000.0})"), "config.json");
  EXPECT_DOUBLE_EQ(v5.rope_theta, 500000.0);
  EXPECT_EQ(v5.rope_theta_from, "rope_parameters.rope_theta");
  EXPECT_TRUE(has(v5, "model.rope_theta=500000.0"));

  const HfModelConfig v4 = parse_hf_config(llama_config(R"("rope_theta": 250000, "rope_scaling": null)"), "c");
  EXPECT_DOUBLE_EQ(v4.rope_theta, 250000.0);
  EXPECT_EQ(v4.rope_theta_from, "rope_theta");

  const HfModelConfig both = parse_hf_config(
      llama_config(R"("rope_theta": 1000, "rope_parameters": {"rope_type": "default", "rope_theta": 1000})"), "c");
  EXPECT_DOUBLE_EQ(both.rope_theta, 1000.0);

  const HfModelConfig none = parse_hf_config(llama_config(""), "c");
  EXPECT_DOUBLE_EQ(none.rope_theta, 10000.0);
  EXPECT_EQ(none.rope_theta_from, "absent: HF's default");
  EXPECT_EQ(none.max_position_embeddings, 128);
  EXPECT_TRUE(has(none, "model.seq_len=128"));

  // An export's config.json (rope_theta and rope_parameters both written) reads back with its theta.
  keel::ModelConfig model;
  model.rope_theta = 123456.0;
  const HfModelConfig back = parse_hf_config(hf_config_json(model, "float32"), "c");
  EXPECT_DOUBLE_EQ(back.rope_theta, 123456.0);
}

TEST(HfConfig, AnythingButPlainRopeIsRefusedNamingTheField) {
  EXPECT_NE(refusal(llama_config(R"("rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
      "factor": 8.0})"))
                .find("hf/config.json: field 'rope_parameters' has rope_type \"llama3\""),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_scaling": {"type": "linear", "factor": 2.0})"))
                .find("hf/config.json: field 'rope_scaling' has type \"linear\""),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_parameters": {"rope_type": "default", "factor": 2.0})"))
                .find("field 'rope_parameters' has factor 2.0"),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_parameters": "default")")).find("field 'rope_parameters' is \"default\""),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("partial_rotary_factor": 0.5)")).find("field 'partial_rotary_factor' is 0.5"),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25})"))
                .find("field 'rope_parameters.partial_rotary_factor' is 0.25"),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_theta": 10000, "rope_parameters": {"rope_theta": 500000})"))
                .find("field 'rope_theta' is 10000.0 but 'rope_parameters.rope_theta' is 500000.0"),
            std::string::npos);
  EXPECT_NE(refusal(llama_config(R"("rope_parameters": {"rope_theta": -1})"))
                .find("field 'rope_parameters.rope_theta' is -1, expected a positive number"),
            std::string::npos);
  // A factor of exactly 1 is plain RoPE.
  EXPECT_EQ(refusal(llama_config(R"("partial_rotary_factor": 1.0)")), "(accepted)");
}

TEST(HfConfig, ExportWritesKeelsSpecialTokens) {
  keel::ModelConfig model;
  const auto config = nlohmann::json::parse(hf_config_json(model, "float32", 1));
  EXPECT_EQ(config["eos_token_id"], 1);
  EXPECT_TRUE(config["bos_token_id"].is_null());
  EXPECT_TRUE(config["pad_token_id"].is_null());
  EXPECT_EQ(config["rope_parameters"]["rope_type"], "default");

  const auto tokenizer = nlohmann::json::parse(hf_tokenizer_config_json("</s>", "<unk>", 64));
  EXPECT_EQ(tokenizer["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tokenizer["add_bos_token"], false);
  EXPECT_EQ(tokenizer["add_eos_token"], false);
  EXPECT_EQ(tokenizer["eos_token"], "</s>");
  EXPECT_EQ(tokenizer["unk_token"], "<unk>");
  EXPECT_TRUE(tokenizer["bos_token"].is_null());
  EXPECT_EQ(tokenizer["model_max_length"], 64);
}

TEST(HfConfig, OtherArchitecturesAreRefusedSayingWhatKeelDoesNotCompute) {
  auto config_of = [](const std::string& type, const std::string& architecture) {
    std::string text = llama_config("\"architectures\": [\"" + architecture + "\"]");
    return text.replace(text.find("\"llama\""), 7, "\"" + type + "\"");
  };
  const std::vector<std::tuple<std::string, std::string, std::string>> refused = {
      {"mistral", "MistralForCausalLM", "sliding-window attention"},
      {"qwen2", "Qwen2ForCausalLM", "biases on the q/k/v projections"},
      {"gpt_neox", "GPTNeoXForCausalLM", "parallel attention + MLP"},
      {"mixtral", "MixtralForCausalLM", "mixture-of-experts"},
      {"gemma", "GemmaForCausalLM", "GeGLU"},
  };
  for (const auto& [type, architecture, why] : refused) {
    const std::string message = refusal(config_of(type, architecture));
    EXPECT_EQ(message.rfind("hf/config.json: field 'model_type' / 'architectures'", 0), 0u) << message;
    EXPECT_NE(message.find(architecture), std::string::npos) << message;
    EXPECT_NE(message.find(why), std::string::npos) << message;
    EXPECT_NE(message.find("LLaMA-layout checkpoints only"), std::string::npos) << message;
  }
  // An unknown family is refused all the same, naming what it says it is.
  const std::string unknown = refusal(config_of("my_arch", "MyArchForCausalLM"));
  EXPECT_NE(unknown.find("not a LlamaForCausalLM / llama model"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("\"my_arch\""), std::string::npos) << unknown;
  // LlamaForCausalLM in `architectures` is enough (some files carry another model_type spelling).
  EXPECT_EQ(refusal(config_of("llama2", "LlamaForCausalLM")), "(accepted)");
}

TEST(HfConfig, AmberSevenBsShapeBecomesKeelsModelKeys) {
  // Amber-7B (LLM360) config.json as published: LlamaForCausalLM, 32 layers, 4096 wide, 32 heads, ffn 11008.
  const HfModelConfig amber = parse_hf_config(
      R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
          "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "hidden_act": "silu",
          "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": null, "tie_word_embeddings": false,
          "torch_dtype": "float32", "use_cache": true, "bos_token_id": 1, "eos_token_id": 2,
          "transformers_version": "4.34.0.dev0"})",
      "amber/config.json");
  for (const char* line :
       {"model.layers=32", "model.d_model=4096", "model.heads=32", "model.kv_heads=32", "model.ffn_hidden=11008",
        "model.vocab=32000", "model.seq_len=2048", "model.tie_embeddings=false", "model.norm=rmsnorm"}) {
    EXPECT_TRUE(has(amber, line)) << line;
  }
  EXPECT_EQ(amber.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(amber.rope_theta, 10000.0);
  EXPECT_EQ(amber.rope_theta_from, "absent: HF's default");
}

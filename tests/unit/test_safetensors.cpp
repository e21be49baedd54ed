// Why: `keel import-hf` reads .safetensors files from outside, so the reader must refuse every malformed file
// with a message naming the file and the tensor or field (and never read past a buffer). These tests write
// files by hand, byte by byte, for each rule of the format; plus the writer/reader round trip, the writer's
// 8-byte header padding, and the Keel <-> HF name and config mapping (torch-free parts of core/interop/).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>

#include "core/interop/hf_llama.h"
#include "core/interop/safetensors.h"

using namespace keel::interop;

namespace {

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

// A file with this exact header text and data section.
std::string file_with(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const SafetensorsError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(other exception) ") + e.what();
  }
  return "(no SafetensorsError)";
}

std::string parse_error(const std::string& bytes) {
  return error_of([&] { parse_safetensors(bytes, "bad.safetensors"); });
}

SafetensorsTensor f32_tensor(const std::string& name, std::vector<int64_t> shape, float first) {
  SafetensorsTensor t;
  t.name = name;
  t.dtype = SafetensorsDtype::kF32;
  t.shape = std::move(shape);
  std::vector<float> values(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < values.size(); ++i) values[i] = first + static_cast<float>(i) * 0.5f;
  t.bytes.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

}  // namespace

TEST(Safetensors, WriterAndReaderRoundTripEveryDtypeAndMetadata) {
  SafetensorsFile file;
  file.metadata = {{"format", "pt"}, {"origin", "keel"}};
  file.tensors.push_back(f32_tensor("a.weight", {2, 3}, 1.0f));
  SafetensorsTensor half{
      "b.weight", SafetensorsDtype::kBF16, {5}, std::string("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a", 10)};
  file.tensors.push_back(half);
  file.tensors.push_back({"c.scalar", SafetensorsDtype::kF16, {}, std::string("\x00\x3c", 2)});
  file.tensors.push_back({"d.empty", SafetensorsDtype::kF32, {0, 4}, ""});

  const std::string bytes = serialize_safetensors(file);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i)
    header_length = (header_length << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ(header_length % 8, 0u) << "the data section starts 8-byte aligned";
  EXPECT_EQ(bytes[8 + header_length - 1] == ' ' || bytes[8 + header_length - 1] == '}', true);

  const SafetensorsFile back = parse_safetensors(bytes, "mem");
  EXPECT_EQ(back.metadata, file.metadata);
  ASSERT_EQ(back.tensors.size(), 4u);
  for (const auto& want : file.tensors) {
    const SafetensorsTensor* got = back.find(want.name);
    ASSERT_NE(got, nullptr) << want.name;
    EXPECT_EQ(got->dtype, want.dtype) << want.name;
    EXPECT_EQ(got->shape, want.shape) << want.name;
    EXPECT_EQ(got->bytes, want.bytes) << want.name;
  }
}

TEST(Safetensors, WriterRefusesBytesThatDoNotMatchTheShapeAndDuplicateNames) {
  SafetensorsFile file;
  file.tensors.push_back(f32_tensor("a", {2, 2}, 0.0f));
  file.tensors.back().bytes.pop_back();
  EXPECT_NE(
      error_of([&] { serialize_safetensors(file); }).find("tensor 'a': has 15 bytes, shape [2, 2] of F32 needs 16"),
      std::string::npos);
  file.tensors = {f32_tensor("a", {1}, 0.0f), f32_tensor("a", {1}, 0.0f)};
  EXPECT_NE(error_of([&] { serialize_safetensors(file); }).find("tensor 'a': duplicate"), std::string::npos);
}

TEST(Safetensors, TruncatedFilesAndBadHeaderLengthsAreRefused) {
  EXPECT_NE(parse_error(std::string("\x10\x00\x00", 3)).find("bad.safetensors: truncated: 3 bytes"), std::string::npos);
  EXPECT_NE(
      parse_error(le64(64) + "{}").find("bad.safetensors: header length 64 is beyond the end of the file (10 bytes)"),
      std::string::npos);
  EXPECT_NE(parse_error(le64(uint64_t{1} << 40) + "{}").find("header length 1099511627776 exceeds the limit"),
            std::string::npos);
  // A valid file cut short inside its data section.
  SafetensorsFile file;
  file.tensors.push_back(f32_tensor("w", {4}, 0.0f));
  const std::string bytes = serialize_safetensors(file);
  EXPECT_NE(parse_error(bytes.substr(0, bytes.size() - 4))
                .find("tensor 'w': data_offsets [0, 16] are out of range: the data section has 12 bytes"),
            std::string::npos);
}

TEST(Safetensors, BadJsonAndBadEntriesAreRefusedByName) {
  EXPECT_NE(parse_error(file_with("{\"a\": ", "")).find("bad.safetensors: header is not valid JSON"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with("[1, 2]", "")).find("header is not a JSON object"), std::string::npos);
  EXPECT_NE(
      parse_error(file_with(R"({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", std::string(8, '\0')))
          .find("bad.safetensors: tensor 'w': dtype 'I64' is not supported"),
      std::string::npos);
  EXPECT_NE(parse_error(
                file_with(R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})", std::string(8, '\0')))
                .find("tensor 'w': field 'shape' has -1; dimensions are non-negative integers"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}})",
                                  std::string(8, '\0')))
                .find("tensor 'w': unknown field 'extra'"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"w": {"dtype": "F32", "shape": [2]}})", std::string(8, '\0')))
                .find("tensor 'w': field 'data_offsets' missing"),
            std::string::npos);
  EXPECT_NE(
      parse_error(file_with(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", std::string(8, '\0')))
          .find("tensor 'w': field 'data_offsets' [8, 0] has begin > end"),
      std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"__metadata__": {"format": 1}})", ""))
                .find("'__metadata__' field 'format' is not a string"),
            std::string::npos);
}

TEST(Safetensors, OffsetsMustTileTheDataSectionExactly) {
  const std::string data(16, '\0');
  EXPECT_NE(parse_error(file_with(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", data))
                .find("tensor 'w': data_offsets span 16 bytes but shape [3] of F32 needs 12"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                  data))
                .find("tensor 'b': data_offsets [4, 12] overlap tensor 'a' (which ends at 8)"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F16", "shape": [2], "data_offsets": [12, 16]}})",
                                  data))
                .find("tensor 'b': data_offsets [12, 16] leave a gap of 4 bytes before it"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                                  data))
                .find("tensor 'b': data_offsets [8, 24] are out of range: the data section has 16 bytes"),
            std::string::npos);
  EXPECT_NE(parse_error(file_with(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", data))
                .find("8 bytes at the end of the data section belong to no tensor"),
            std::string::npos);
}

TEST(HfLlamaMapping, KeelNamesMapToLlamaForCausalLMNames) {
  EXPECT_EQ(hf_name_of("embed.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(hf_name_of("blocks.3.attn.wq.weight"), "model.layers.3.self_attn.q_proj.weight");
  EXPECT_EQ(hf_name_of("blocks.0.attn.wo.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(hf_name_of("blocks.12.mlp.w_gate.weight"), "model.layers.12.mlp.gate_proj.weight");
  EXPECT_EQ(hf_name_of("blocks.1.mlp_norm.weight"), "model.layers.1.post_attention_layernorm.weight");
  EXPECT_EQ(hf_name_of("blocks.1.attn_norm.weight"), "model.layers.1.input_layernorm.weight");
  EXPECT_EQ(hf_name_of("final_norm.weight"), "model.norm.weight");
  EXPECT_EQ(hf_name_of("head.weight"), "lm_head.weight");
  EXPECT_THROW(hf_name_of("blocks.0.attn.q_norm.weight"), std::runtime_error);
  EXPECT_THROW(hf_name_of("blocks.0.attn_norm.bias"), std::runtime_error);
}

TEST(HfLlamaMapping, ConfigJsonRoundTripsAndUnsupportedFeaturesAreRefusedByKey) {
  keel::ModelConfig model;
  model.layers = 3;
  model.kv_heads = 2;
  model.tie_embeddings = true;
  const auto overrides = keel_model_overrides_from_hf_config(hf_config_json(model, "float32"), "config.json");
  EXPECT_NE(std::find(overrides.begin(), overrides.end(), "model.layers=3"), overrides.end());
  EXPECT_NE(std::find(overrides.begin(), overrides.end(), "model.kv_heads=2"), overrides.end());
  EXPECT_NE(std::find(overrides.begin(), overrides.end(), "model.tie_embeddings=true"), overrides.end());

  auto refusal = [](const keel::ModelConfig& m) {
    try {
      check_hf_expressible(m, "ckpt/config.ini");
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  keel::ModelConfig layernorm;
  layernorm.norm = keel::NormKind::kLayerNorm;
  EXPECT_NE(refusal(layernorm).find("ckpt/config.ini: model.norm = layernorm"), std::string::npos);
  keel::ModelConfig partial;
  partial.rotary_fraction = 0.25;
  EXPECT_NE(refusal(partial).find("model.rotary_fraction"), std::string::npos);
  keel::ModelConfig qk;
  qk.qk_norm = true;
  EXPECT_NE(refusal(qk).find("model.qk_norm"), std::string::npos);
  keel::ModelConfig zloss;
  zloss.z_loss = 1e-4;
  EXPECT_EQ(refusal(zloss), "(accepted)");

  EXPECT_THROW(keel_model_overrides_from_hf_config(R"({"model_type": "gpt2"})", "config.json"), std::runtime_error);
  const std::string scaled =
      R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "intermediate_size": 176, "vocab_size": 2048, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "rope_scaling": {"type": "linear", "factor": 2.0}})";
  try {
    keel_model_overrides_from_hf_config(scaled, "hf/config.json");
    ADD_FAILURE() << "rope_scaling accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("hf/config.json: field 'rope_scaling'"), std::string::npos) << e.what();
  }
}

// Why: the Hugging Face round trip a user relies on, through the real `keel` binary: a trained checkpoint
// exported as LlamaForCausalLM (with Keel's special tokens and its SentencePiece tokenizer) and imported back
// has bit-identical fp32 weights and a fresh optimizer state (the config's optimizer plugin's own), the
// imported run resumes and trains; a bf16 export imports as exactly the bf16-rounded masters; what HF LLaMA
// cannot express (LayerNorm) is refused naming the key, and an HF directory with a missing tensor, a foreign
// tokenizer or one with too many pieces is refused by name, before any run dir is written; an older
// checkpoint's rotary_emb.inv_freq buffers are skipped and transformers 5's rope_parameters reach the run.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/interop/safetensors.h"
#include "keel_process.h"

using namespace keel::testing;
using keel::checkpoint::NamedTensors;
namespace fs = std::filesystem;

namespace {

std::string base_args(const std::string& extra = "") {
  return "--config " + tiny_config() + " " + test_data_override() + " " + extra;
}

keel::checkpoint::TrainingState full_state(const std::string& dir) {
  return keel::checkpoint::read_full_state(dir, keel::checkpoint::verify_checkpoint_dir(dir), -1);
}

const at::Tensor* find(const NamedTensors& list, const std::string& name) {
  for (const auto& [n, t] : list) {
    if (n == name) return &t;
  }
  return nullptr;
}

// A trained 1-step tiny run exported to `hf` (fp32, with its tokenizer); returns the checkpoint directory.
std::string train_and_export(const std::string& run, const std::string& hf, const std::string& extra = "") {
  auto r = run_keel("train " + base_args("--set train.steps=1 " + extra) + " --run-dir " + run);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = run + "/checkpoints/step-00000001";
  r = run_keel("export-hf " + ckpt + " " + hf);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return ckpt;
}

// The last line of `output` parsed as JSON (a --json command's stdout, after any log lines).
nlohmann::json last_json_line(const std::string& output) {
  std::string line, last;
  std::istringstream in(output);
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  return nlohmann::json::parse(last, nullptr, /*allow_exceptions=*/false);
}

// Protobuf wire bytes, written here independently of SentencePiece: a varint, and a length-delimited field.
std::string varint(uint64_t v) {
  std::string out;
  do {
    out.push_back(static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0)));
    v >>= 7;
  } while (v != 0);
  return out;
}
std::string length_delimited(int field, const std::string& bytes) {
  return varint(static_cast<uint64_t>(field) << 3 | 2) + varint(bytes.size()) + bytes;
}

// HF_DIR copied from `hf` with `tokenizer_bytes` as its tokenizer.model.
std::string hf_dir_with_tokenizer(const std::string& hf, const std::string& name, const std::string& tokenizer_bytes) {
  const std::string dir = fresh_dir(name);
  fs::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer_config.json"})
    fs::copy_file(hf + "/" + f, dir + "/" + f);
  std::ofstream(dir + "/tokenizer.model", std::ios::binary) << tokenizer_bytes;
  return dir;
}

}  // namespace

TEST(HfInterop, ExportImportIsBitIdenticalAndTheImportResumesAndTrains) {
  const std::string run = fresh_dir("hf-run"), hf = fresh_dir("hf-out"), imported = fresh_dir("hf-imported"),
                    resumed = fresh_dir("hf-resumed");
  auto r = run_keel("train " + base_args("--set train.steps=2") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = run + "/checkpoints/step-00000002";

  r = run_keel("export-hf " + ckpt + " " + hf);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto config = nlohmann::json::parse(keel::checkpoint::read_small_file(hf + "/config.json"));
  EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(config["torch_dtype"], "float32");
  EXPECT_EQ(config["hidden_size"], 64);
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  // Keel's special tokens: EOS id 1 (prepared.json), no BOS, never padded.
  EXPECT_EQ(config["eos_token_id"], 1);
  EXPECT_TRUE(config["bos_token_id"].is_null());
  EXPECT_TRUE(config["pad_token_id"].is_null());
  EXPECT_EQ(keel::checkpoint::read_small_file(hf + "/tokenizer.model"),
            keel::checkpoint::read_small_file(std::string(KEEL_TEST_DATA_DIR) + "/tokenizer.model"));
  const auto tokenizer_config = nlohmann::json::parse(keel::checkpoint::read_small_file(hf + "/tokenizer_config.json"));
  EXPECT_EQ(tokenizer_config["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tokenizer_config["add_bos_token"], false);
  EXPECT_EQ(tokenizer_config["eos_token"], "</s>");
  const auto weights = keel::interop::read_safetensors(hf + "/model.safetensors");
  EXPECT_EQ(weights.tensors.size(), 2u + 2u * 9u + 1u);  // embed, head, 9 per block, final norm
  const auto* down = weights.find("model.layers.1.mlp.down_proj.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->dtype, keel::interop::SafetensorsDtype::kF32);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{64, 176}));
  ASSERT_NE(weights.find("lm_head.weight"), nullptr);

  // A second export into the same directory is refused: nothing is overwritten.
  r = run_keel("export-hf " + ckpt + " " + hf);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("exists and is not an empty directory"), std::string::npos) << r.output;

  r = run_keel("import-hf " + hf + " --run-dir " + imported + " " + base_args());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("max_position_embeddings 64 (config.json); training sequence length model.seq_len 64"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("2048 pieces, EOS id 1); the same file as the prepared data's"), std::string::npos)
      << r.output;
  const auto original = full_state(ckpt);
  const auto back = full_state(imported + "/checkpoints/step-00000000");
  ASSERT_EQ(back.model.size(), original.model.size());
  for (const auto& [name, tensor] : original.model) {
    const at::Tensor* t = find(back.model, name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->scalar_type(), torch::kFloat) << name;
    EXPECT_TRUE(torch::equal(*t, tensor)) << name << " is not bit-identical after export + import";
  }
  EXPECT_EQ(back.step, 0);
  EXPECT_EQ(back.optimizer_name, "adamw");
  EXPECT_EQ(back.optimizer_step, 0);
  ASSERT_EQ(back.optimizer.size(), 2 * back.model.size());
  for (const auto& [name, tensor] : back.optimizer) EXPECT_EQ(tensor.abs().max().item<float>(), 0.0f) << name;
  EXPECT_NE(back.lineage.find("imported from Hugging Face"), std::string::npos) << back.lineage;

  r = run_keel("resume --from " + imported + " --run-dir " + resumed + " --allow-data-change --set train.steps=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto trained = full_state(resumed + "/checkpoints/step-00000001");
  EXPECT_EQ(trained.step, 1);
  EXPECT_EQ(trained.optimizer_step, 1);
  EXPECT_FALSE(
      torch::equal(*find(trained.model, "blocks.0.attn.wq.weight"), *find(back.model, "blocks.0.attn.wq.weight")))
      << "the resumed run did not update the weights";
  EXPECT_NE(trained.lineage.find(imported), std::string::npos) << trained.lineage;
}

TEST(HfInterop, Bf16ExportImportsAsTheRoundedMasters) {
  const std::string run = fresh_dir("hf16-run"), hf = fresh_dir("hf16-out"), imported = fresh_dir("hf16-imported");
  auto r = run_keel("train " + base_args("--set train.steps=1 --set model.tie_embeddings=true") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = run + "/checkpoints/step-00000001";
  r = run_keel("export-hf " + ckpt + " " + hf + " --dtype bf16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(nlohmann::json::parse(keel::checkpoint::read_small_file(hf + "/config.json"))["torch_dtype"], "bfloat16");
  const auto weights = keel::interop::read_safetensors(hf + "/model.safetensors");
  EXPECT_EQ(weights.find("lm_head.weight"), nullptr) << "tied embeddings: no separate lm_head";
  EXPECT_EQ(weights.find("model.embed_tokens.weight")->dtype, keel::interop::SafetensorsDtype::kBF16);

  r = run_keel("import-hf " + hf + " --run-dir " + imported + " " + base_args());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto original = full_state(ckpt);
  const auto back = full_state(imported + "/checkpoints/step-00000000");
  ASSERT_EQ(back.model.size(), original.model.size());
  for (const auto& [name, tensor] : original.model) {
    const at::Tensor* t = find(back.model, name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_TRUE(torch::equal(*t, tensor.to(torch::kBFloat16).to(torch::kFloat))) << name;
  }
}

TEST(HfInterop, LayerNormModelsAndIncompleteHfDirectoriesAreRefusedByName) {
  const std::string run = fresh_dir("hfln-run"), hf = fresh_dir("hfln-out");
  auto r = run_keel("train " + base_args("--set train.steps=1 --set model.norm=layernorm") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("export-hf " + run + "/checkpoints/step-00000001 " + hf);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("model.norm = layernorm"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(hf)) << "a refused export wrote its output directory";

  // An RMSNorm export with one tensor taken out of model.safetensors: the import names it, writes nothing.
  const std::string good = fresh_dir("hfln-good"), partial = fresh_dir("hfln-partial"),
                    target = fresh_dir("hfln-target");
  r = run_keel("train " + base_args("--set train.steps=1") + " --run-dir " + good);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_keel("export-hf " + good + "/checkpoints/step-00000001 " + hf);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto weights = keel::interop::read_safetensors(hf + "/model.safetensors");
  weights.tensors.erase(
      std::remove_if(weights.tensors.begin(), weights.tensors.end(),
                     [](const auto& t) { return t.name == "model.layers.1.self_attn.k_proj.weight"; }),
      weights.tensors.end());
  fs::create_directories(partial);
  fs::copy_file(hf + "/config.json", partial + "/config.json");
  std::ofstream(partial + "/model.safetensors", std::ios::binary) << keel::interop::serialize_safetensors(weights);
  r = run_keel("import-hf " + partial + " --run-dir " + target + " " + base_args());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(
      r.output.find("tensor 'model.layers.1.self_attn.k_proj.weight' (Keel 'blocks.1.attn.wk.weight') is missing"),
      std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(target)) << "a refused import wrote its run dir";
}

TEST(HfInterop, RotaryBuffersOfOlderCheckpointsAreSkippedAndRopeParametersReachTheRun) {
  const std::string run = fresh_dir("hfrope-run"), hf = fresh_dir("hfrope-out"), old = fresh_dir("hfrope-old"),
                    imported = fresh_dir("hfrope-imported"), odd = fresh_dir("hfrope-odd"),
                    refused = fresh_dir("hfrope-refused");
  train_and_export(run, hf);
  // An older HF checkpoint: one rotary_emb.inv_freq buffer per layer [head_dim / 2]; transformers 5's
  // config.json: rope_parameters and no top-level rope_theta.
  auto weights = keel::interop::read_safetensors(hf + "/model.safetensors");
  const auto inv_freq = [](int layer) {
    keel::interop::SafetensorsTensor t;
    t.name = "model.layers." + std::to_string(layer) + ".self_attn.rotary_emb.inv_freq";
    t.dtype = keel::interop::SafetensorsDtype::kF32;
    t.shape = {8};
    t.bytes.assign(8 * sizeof(float), '\0');
    return t;
  };
  weights.tensors.push_back(inv_freq(0));
  weights.tensors.push_back(inv_freq(1));
  auto config = nlohmann::json::parse(keel::checkpoint::read_small_file(hf + "/config.json"));
  config.erase("rope_theta");
  config["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  fs::create_directories(old);
  std::ofstream(old + "/config.json") << config.dump(2);
  std::ofstream(old + "/model.safetensors", std::ios::binary) << keel::interop::serialize_safetensors(weights);

  auto r = run_keel("import-hf " + old + " --run-dir " + imported + " --json " + base_args());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto result = last_json_line(r.output);
  ASSERT_TRUE(result.is_object()) << r.output;
  EXPECT_EQ(result["rope_theta"], 500000.0);
  EXPECT_EQ(result["max_position_embeddings"], 64);
  EXPECT_EQ(result["seq_len"], 64);
  EXPECT_TRUE(result["tokenizer"].is_null()) << "no tokenizer.model in this HF dir";
  const auto manifest = keel::checkpoint::verify_checkpoint_dir(imported + "/checkpoints/step-00000000");
  EXPECT_EQ(manifest.model.at("model.rope_theta"), "500000");

  // A buffer whose name only looks like one (another module's inv_freq) is still refused by name.
  weights.tensors.back().name = "model.layers.1.self_attn.not_rotary_emb.inv_freq";
  fs::create_directories(odd);
  fs::copy_file(old + "/config.json", odd + "/config.json");
  std::ofstream(odd + "/model.safetensors", std::ios::binary) << keel::interop::serialize_safetensors(weights);
  r = run_keel("import-hf " + odd + " --run-dir " + refused + " " + base_args());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("tensor 'model.layers.1.self_attn.not_rotary_emb.inv_freq' has no place"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(refused)) << "a refused import wrote its run dir";
}

TEST(HfInterop, AForeignOrOversizedTokenizerIsRefusedByNameAndAnAllowedOneIsRecorded) {
  const std::string run = fresh_dir("hftok-run"), hf = fresh_dir("hftok-out"), target = fresh_dir("hftok-target");
  train_and_export(run, hf);
  const std::string original = keel::checkpoint::read_small_file(hf + "/tokenizer.model");
  // Another file, same pieces: the original with an unknown protobuf field (number 100, varint 1) appended.
  const std::string foreign = hf_dir_with_tokenizer(hf, "hftok-foreign", original + varint(100 << 3) + varint(1));
  auto r = run_keel("import-hf " + foreign + " --run-dir " + target + " " + base_args());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(foreign + "/tokenizer.model (sha256 "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("is not the tokenizer the data in"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--allow-tokenizer-change"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(target)) << "a refused import wrote its run dir";

  r = run_keel("import-hf " + foreign + " --run-dir " + target + " --allow-tokenizer-change " + base_args());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto lineage = full_state(target + "/checkpoints/step-00000000").lineage;
  EXPECT_NE(lineage.find("(allowed: --allow-tokenizer-change)"), std::string::npos) << lineage;

  // One piece more than vocab_size: a ModelProto `pieces` entry (field 1) appended, as SentencePiece writes one
  // (piece = 1, score = 2 as fixed32, type = 3 NORMAL).
  float score = -1e9f;
  std::string score_bytes(sizeof score, '\0');
  std::memcpy(score_bytes.data(), &score, sizeof score);
  const std::string piece =
      length_delimited(1, "zzqqextra") + varint(2 << 3 | 5) + score_bytes + varint(3 << 3) + varint(1);
  const std::string oversized = hf_dir_with_tokenizer(hf, "hftok-oversized", original + length_delimited(1, piece));
  const std::string target2 = fresh_dir("hftok-target2");
  r = run_keel("import-hf " + oversized + " --run-dir " + target2 + " --allow-tokenizer-change " + base_args());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(
      r.output.find(oversized + "/tokenizer.model: 2049 pieces, but the model's vocab_size (model.vocab) is 2048"),
      std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(target2));

  // Not a SentencePiece model at all: refused naming the file.
  const std::string garbage = hf_dir_with_tokenizer(hf, "hftok-garbage", "not a model");
  r = run_keel("import-hf " + garbage + " --run-dir " + target2 + " " + base_args());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(garbage + "/tokenizer.model"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(target2));
}

TEST(HfInterop, TheImportAsksTheConfiguredOptimizerPluginForItsState) {
  const std::string run = fresh_dir("hfopt-run"), hf = fresh_dir("hfopt-out"), imported = fresh_dir("hfopt-imp"),
                    resumed = fresh_dir("hfopt-resumed");
  train_and_export(run, hf);
  auto r = run_keel("import-hf " + hf + " --run-dir " + imported + " " + base_args("--set plugins.optimizer=lion"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto back = full_state(imported + "/checkpoints/step-00000000");
  EXPECT_EQ(back.optimizer_name, "lion");
  EXPECT_EQ(back.optimizer_step, 0);
  ASSERT_EQ(back.optimizer.size(), back.model.size()) << "lion keeps one moment per parameter";
  for (const auto& [name, tensor] : back.optimizer) {
    EXPECT_EQ(name.substr(name.rfind('/')), "/exp_avg") << name;
    EXPECT_EQ(tensor.abs().max().item<float>(), 0.0f) << name;
  }
  r = run_keel("resume --from " + imported + " --run-dir " + resumed + " --allow-data-change --set train.steps=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(full_state(resumed + "/checkpoints/step-00000001").optimizer_name, "lion");
}

TEST(HfInterop, ExportNeedsTheDatasTokenizerOrNoTokenizer) {
  // A run on a copy of the prepared data whose prepared.json is then removed: its tokenizer cannot be vouched for.
  const std::string data = fresh_dir("hfnotok-data"), run = fresh_dir("hfnotok-run"), hf = fresh_dir("hfnotok-out");
  fs::copy(KEEL_TEST_DATA_DIR, data, fs::copy_options::recursive);
  auto r =
      run_keel("train --config " + tiny_config() + " --set data.dir=" + data + " --set train.steps=1 --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::remove(data + "/prepared.json");
  const std::string ckpt = run + "/checkpoints/step-00000001";
  r = run_keel("export-hf " + ckpt + " " + hf);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("its data dir has no prepared.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--no-tokenizer"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(hf)) << "a refused export wrote its output directory";

  r = run_keel("export-hf " + ckpt + " " + hf + " --no-tokenizer");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(fs::exists(hf + "/tokenizer.model"));
  EXPECT_FALSE(fs::exists(hf + "/tokenizer_config.json"));
  EXPECT_EQ(nlohmann::json::parse(keel::checkpoint::read_small_file(hf + "/config.json"))["eos_token_id"], 1)
      << "the EOS id comes from the checkpoint's data fingerprint";
}

// Why: the Hugging Face round trip a user relies on, through the real `keel` binary: a trained checkpoint
// exported as LlamaForCausalLM and imported back has bit-identical fp32 weights and a fresh AdamW state, the
// imported run resumes and trains; a bf16 export imports as exactly the bf16-rounded masters; what HF LLaMA
// cannot express (LayerNorm) is refused naming the key, and an HF directory with a missing tensor is refused
// naming the tensor, before any run dir is written.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

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

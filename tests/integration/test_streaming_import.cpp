// Why: `keel import-hf` of a 7B-class model (Amber-7B: 6.7B parameters, 27 GB of fp32 masters and 54 GB of
// AdamW moments) must not hold the model: it writes the checkpoint's rank file one tensor at a time as each is
// read from the safetensors files (weights) or made by the optimizer plugin (its fresh state). What must hold:
// the streamed rank file is the file the whole-state writer writes; a bad tensor is refused by name and leaves no
// file; the import's peak memory grows by a few tensors, far below the model (measured with wait4 on the child,
// robust on a loaded machine: the bound is a fraction of the model, the old whole-model import is several times
// it); and a dry run checks an Amber-7B-shaped directory (sparse shards: headers only, no data) for shape and
// config without reading a tensor, while other architectures are refused saying why.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <tuple>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/checkpoint_writer.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"
#include "core/config/memory_estimate.h"
#include "core/interop/hf_llama.h"
#include "core/interop/safetensors.h"
#include "keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// `keel ARGUMENTS` with the peak RSS of that process alone (wait4's rusage of the child). Freed large buffers
// go back to the OS (MALLOC_MMAP_THRESHOLD_, as bench/stream_memory.sh), so the peak counts live bytes.
struct Measured {
  int exit_code = -1;
  int64_t peak_bytes = 0;
  std::string output;
};
Measured run_keel_measured(const std::string& arguments) {
  const std::string log = fresh_dir("measured") + ".log";
  const pid_t pid = fork();
  if (pid == 0) {
    setenv("MALLOC_MMAP_THRESHOLD_", "65536", 1);
    const std::string command = std::string("exec ") + KEEL_BINARY + " " + arguments + " >" + log + " 2>&1";
    execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
    _exit(127);
  }
  Measured m;
  int status = 0;
  struct rusage usage {};
  if (wait4(pid, &status, 0, &usage) != pid) return m;
  m.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  m.peak_bytes = static_cast<int64_t>(usage.ru_maxrss) * 1024;
  std::ifstream in(log);
  m.output.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  fs::remove(log);
  return m;
}

// The model of tiny.ini with `overrides`.
Config model_config(const std::vector<std::string>& overrides) { return load_config(tiny_config(), overrides); }

// HF_DIR for `config`'s model: config.json and model.safetensors in BF16, every element `value`.
void write_hf_dir(const std::string& dir, const Config& config, float value) {
  fs::create_directories(dir);
  std::vector<interop::SafetensorsEntry> entries;
  for (const ParameterTensor& p : parameter_tensors(config.model))
    entries.push_back({interop::hf_name_of(p.name), interop::SafetensorsDtype::kBF16, p.global_shape});
  const at::Tensor one = torch::full({1}, value).to(torch::kBFloat16);
  const std::string element(static_cast<const char*>(one.data_ptr()), 2);
  interop::write_safetensors_streaming(dir + "/model.safetensors", {{"format", "pt"}}, entries,
                                       [&](size_t i, const std::function<void(const char*, size_t)>& write) {
                                         std::string row;
                                         for (int64_t k = 0; k < entries[i].shape.back(); ++k) row += element;
                                         for (int64_t r = 0; r < entries[i].numel() / entries[i].shape.back(); ++r)
                                           write(row.data(), row.size());
                                       });
  std::ofstream(dir + "/config.json") << interop::hf_config_json(config.model, "bfloat16");
}

std::string import_args(const std::string& hf, const std::string& run, const std::string& extra = "") {
  return "import-hf " + hf + " --run-dir " + run + " --config " + tiny_config() + " " + test_data_override() + " " +
         extra;
}

TEST(StreamingImport, TheStreamedRankFileIsTheFileTheWholeWriterWrites) {
  // A real checkpoint's state: tensors, optimizer JSON, schedule, ledger, config, lineage, plugin state.
  const std::string run = fresh_dir("simp-src");
  ProcessResult r =
      run_keel("train " + tiny_args("--set train.steps=1 --set checkpoint.at_end=true") + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = checkpoint::resolve_checkpoint(run).dir;
  const checkpoint::TrainingState state = checkpoint::read_rank_file(ckpt + "/" + checkpoint::rank_file_name(0));
  ASSERT_FALSE(state.model.empty());
  ASSERT_FALSE(state.optimizer.empty());
  checkpoint::TrainingState names = state;  // placeholders: shapes and dtypes only
  for (auto* list : {&names.model, &names.optimizer})
    for (auto& [name, t] : *list) t = torch::empty(t.sizes(), t.options().device(torch::kMeta));
  const std::string dir = fresh_dir("simp-files");
  fs::create_directories(dir);
  checkpoint::write_rank_file(dir + "/whole.h5", state, {0, 1});
  int64_t asked = 0;
  checkpoint::write_rank_file_streaming(
      dir + "/streamed.h5", names, {0, 1},
      [&](size_t i) {
        ++asked;
        return state.model.at(i).second.clone();
      },
      [&](size_t i) {
        ++asked;
        return state.optimizer.at(i).second.clone();
      });
  EXPECT_EQ(asked, static_cast<int64_t>(state.model.size() + state.optimizer.size())) << "each tensor asked once";
  EXPECT_EQ(fs::file_size(dir + "/whole.h5"), fs::file_size(dir + "/streamed.h5"));
  const checkpoint::TrainingState a = checkpoint::read_rank_file(dir + "/whole.h5");
  const checkpoint::TrainingState b = checkpoint::read_rank_file(dir + "/streamed.h5");
  for (const auto& [x, y] : {std::pair{&a.model, &b.model}, std::pair{&a.optimizer, &b.optimizer}}) {
    ASSERT_EQ(x->size(), y->size());
    for (size_t i = 0; i < x->size(); ++i) {
      EXPECT_EQ((*x)[i].first, (*y)[i].first);
      EXPECT_TRUE(torch::equal((*x)[i].second, (*y)[i].second)) << (*x)[i].first;
    }
  }
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.tokens_seen, b.tokens_seen);
  EXPECT_EQ(a.optimizer_name, b.optimizer_name);
  EXPECT_EQ(a.optimizer_json, b.optimizer_json);
  EXPECT_EQ(a.lr_schedule, b.lr_schedule);
  EXPECT_EQ(a.data_ledger, b.data_ledger);
  EXPECT_EQ(a.config_ini, b.config_ini);
  EXPECT_EQ(a.lineage, b.lineage);
  ASSERT_EQ(a.plugins.size(), b.plugins.size());
  EXPECT_TRUE(torch::equal(a.cpu_rng, b.cpu_rng));
}

TEST(StreamingImport, ABadTensorIsRefusedByNameAndLeavesNoFile) {
  checkpoint::TrainingState s;
  s.model = {{"w", torch::empty({2, 3}, torch::TensorOptions().device(torch::kMeta))},
             {"v", torch::empty({4}, torch::TensorOptions().device(torch::kMeta))}};
  s.optimizer_name = "adamw";
  s.optimizer_json = R"({"step": 0})";
  s.lr_schedule = R"({"kind": "warmup_cosine"})";
  s.data_ledger = "{}";
  const std::string dir = fresh_dir("simp-bad");
  fs::create_directories(dir);
  auto refusal = [&](const checkpoint::TensorSource& model) {
    try {
      checkpoint::write_rank_file_streaming(dir + "/rank.h5", s, {0, 1}, model, [](size_t) { return at::Tensor(); });
    } catch (const checkpoint::CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("(written)");
  };
  const std::string nan = refusal([](size_t i) {
    return i == 0 ? torch::zeros({2, 3}) : torch::full({4}, std::numeric_limits<float>::quiet_NaN());
  });
  EXPECT_EQ(nan, "cannot save checkpoint step 0: model tensor v holds NaN/Inf (rank.h5)");
  EXPECT_FALSE(fs::exists(dir + "/rank.h5"));
  const std::string shape = refusal([](size_t) { return torch::zeros({3, 2}); });
  EXPECT_NE(shape.find("rank.h5: model tensor w came as [3, 2] Float, expected [2, 3] Float"), std::string::npos)
      << shape;
  EXPECT_FALSE(fs::exists(dir + "/rank.h5"));
}

TEST(StreamingImport, PeakMemoryGrowsByAFewTensorsNotByTheModel) {
  // 16 blocks of equal size: the largest tensor (ffn x d_model, 1 MiB in fp32) is under 1% of the model.
  const Config config = model_config(
      {"model.layers=16", "model.d_model=256", "model.heads=4", "model.kv_heads=4", "model.ffn_hidden=1024"});
  int64_t params = 0, largest = 0;
  for (const ParameterTensor& p : parameter_tensors(config.model)) {
    params += static_cast<int64_t>(p.elements());
    largest = std::max(largest, static_cast<int64_t>(p.elements()));
  }
  const int64_t model_fp32 = params * 4;  // the masters alone; AdamW's fresh state is twice that again
  const std::string hf = fresh_dir("simp-mem-hf"), run = fresh_dir("simp-mem-run");
  write_hf_dir(hf, config, 0.25f);
  const Measured baseline = run_keel_measured("--help");
  ASSERT_EQ(baseline.exit_code, 0) << baseline.output;
  const Measured import = run_keel_measured(import_args(hf, run));
  ASSERT_EQ(import.exit_code, 0) << import.output;
  const double growth = static_cast<double>(import.peak_bytes - baseline.peak_bytes);
  std::cout << "import-hf of " << params << " parameters (" << model_fp32 / 1048576.0 << " MiB fp32, largest tensor "
            << largest * 4 / 1048576.0 << " MiB): peak RSS " << import.peak_bytes / 1048576.0 << " MiB, baseline "
            << baseline.peak_bytes / 1048576.0 << " MiB, growth " << growth / 1048576.0 << " MiB\n";
  // Holding the model (the import before streaming) grows by 3x model_fp32 or more (weights + two moments).
  EXPECT_LT(growth, 0.5 * static_cast<double>(model_fp32));

  // What it wrote: every weight as its fp32 master, AdamW's zero moments.
  const std::string ckpt = checkpoint::resolve_checkpoint(run).dir;
  const checkpoint::TrainingState back = checkpoint::read_full_state(ckpt, checkpoint::verify_checkpoint_dir(ckpt), -1);
  ASSERT_EQ(back.model.size(), parameter_tensors(config.model).size());
  for (const auto& [name, t] : back.model) EXPECT_TRUE(torch::equal(t, torch::full_like(t, 0.25f))) << name;
  ASSERT_EQ(back.optimizer.size(), 2 * back.model.size());
  for (const auto& [name, t] : back.optimizer) EXPECT_EQ(t.abs().max().item<float>(), 0.0f) << name;
  fs::remove_all(hf);
  fs::remove_all(run);
}

// A safetensors file of `entries` whose data section is a hole (fs::resize_file): the header is real, the data
// takes no disk and is never read by a dry run.
void write_sparse_safetensors(const std::string& path,
                              const std::vector<std::pair<std::string, ParameterTensor>>& entries) {
  json header = {{"__metadata__", {{"format", "pt"}}}};
  uint64_t offset = 0;
  for (const auto& [hf_name, p] : entries) {
    const uint64_t bytes = static_cast<uint64_t>(p.elements()) * 2;  // BF16
    header[hf_name] = {{"dtype", "BF16"}, {"shape", p.global_shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  std::ofstream(path, std::ios::binary) << length << text;
  fs::resize_file(path, 8 + text.size() + offset);
}

// Amber-7B's config.json (LLM360/Amber: LlamaForCausalLM, as published).
json amber_config() {
  return json::parse(R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2})");
}

TEST(StreamingImport, AnAmber7bShapedDirectoryPassesADryRunFromItsHeadersAlone) {
  // Amber-7B's layout: 32 x 9 block tensors + embedding, final norm, head in two shards (13.5 GB of BF16 as
  // holes: nothing is read but the headers).
  const Config amber = model_config({"model.layers=32", "model.d_model=4096", "model.heads=32", "model.kv_heads=32",
                                     "model.ffn_hidden=11008", "model.vocab=32000", "model.seq_len=2048"});
  const std::vector<ParameterTensor> tensors = parameter_tensors(amber.model);
  ASSERT_EQ(tensors.size(), 291u);
  const std::string hf = fresh_dir("simp-amber");
  fs::create_directories(hf);
  std::vector<std::pair<std::string, ParameterTensor>> first, second;
  json weight_map = json::object();
  for (const ParameterTensor& p : tensors) {
    const bool in_first = p.layer >= 0 && p.layer < 16 ? true : p.name == "embed.weight";
    const std::string file = in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    (in_first ? first : second).emplace_back(interop::hf_name_of(p.name), p);
    weight_map[interop::hf_name_of(p.name)] = file;
  }
  write_sparse_safetensors(hf + "/model-00001-of-00002.safetensors", first);
  write_sparse_safetensors(hf + "/model-00002-of-00002.safetensors", second);
  std::ofstream(hf + "/model.safetensors.index.json") << json{{"metadata", json::object()}, {"weight_map", weight_map}};
  std::ofstream(hf + "/config.json") << amber_config().dump();

  const Measured baseline = run_keel_measured("--help");
  ASSERT_EQ(baseline.exit_code, 0) << baseline.output;
  const Measured dry = run_keel_measured("import-hf " + hf + " --dry-run --json --config " + tiny_config());
  ASSERT_EQ(dry.exit_code, 0) << dry.output;
  const json plan = json::parse(dry.output.substr(dry.output.find('{')), nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(plan.is_object()) << dry.output;
  EXPECT_EQ(plan["dry_run"], true);
  EXPECT_EQ(plan["parameters"], 6738415616);  // LLaMA-7B's count: Amber-7B
  EXPECT_EQ(plan["tensors"], 291);
  EXPECT_EQ(plan["weight_files"], 2);
  EXPECT_EQ(plan["source_bytes"], int64_t{6738415616} * 2);
  EXPECT_EQ(plan["largest_tensor_fp32_bytes"], int64_t{32000} * 4096 * 4);  // the embedding (and the head)
  EXPECT_EQ(plan["model"]["layers"], 32);
  EXPECT_EQ(plan["model"]["ffn_hidden"], 11008);
  EXPECT_EQ(plan["seq_len"], 2048);
  // Headers only: the process never holds even one of its 250 MB tensors.
  EXPECT_LT(dry.peak_bytes - baseline.peak_bytes, int64_t{32000} * 4096 * 2 / 2)
      << "peak " << dry.peak_bytes << ", baseline " << baseline.peak_bytes;

  // A wrong shape in a header is refused by name, still without reading data.
  json wrong = amber_config();
  wrong["intermediate_size"] = 11000;
  std::ofstream(hf + "/config.json") << wrong.dump();
  ProcessResult r = run_keel("import-hf " + hf + " --dry-run --config " + tiny_config());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [11008, 4096]"), std::string::npos)
      << r.output;

  // --dry-run writes nothing, so it takes no --run-dir; without --dry-run, --run-dir is required.
  const std::string run = fresh_dir("simp-amber-run");
  r = run_keel("import-hf " + hf + " --dry-run --run-dir " + run + " --config " + tiny_config());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--dry-run writes nothing: drop --run-dir"), std::string::npos) << r.output;
  r = run_keel("import-hf " + hf + " --config " + tiny_config());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--run-dir is required"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(run));
  fs::remove_all(hf);
}

TEST(StreamingImport, NonLlamaArchitecturesAreRefusedSayingWhyBeforeTheRunDirIsClaimed) {
  const Config config = model_config({});
  const std::string hf = fresh_dir("simp-arch"), run = fresh_dir("simp-arch-run");
  write_hf_dir(hf, config, 0.5f);
  const std::vector<std::tuple<std::string, std::string, std::string>> refused = {
      {"mistral", "MistralForCausalLM", "sliding-window attention (sliding_window)"},
      {"qwen2", "Qwen2ForCausalLM", "biases on the q/k/v projections"},
      {"gpt_neox", "GPTNeoXForCausalLM", "parallel attention + MLP"},
  };
  for (const auto& [type, architecture, why] : refused) {
    json c = json::parse(interop::hf_config_json(config.model, "bfloat16"));
    c["model_type"] = type;
    c["architectures"] = {architecture};
    std::ofstream(hf + "/config.json") << c.dump();
    const ProcessResult r = run_keel(import_args(hf, run));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(hf + "/config.json: field 'model_type' / 'architectures'"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(why), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(run));
  }
  fs::remove_all(hf);
}

}  // namespace
}  // namespace keel::testing

// Why: `keel export-hf CKPT_DIR OUT_DIR [--dtype fp32|bf16] [--no-tokenizer] [--max-shard-size SIZE]` and `keel
// import-hf HF_DIR (--run-dir RUN_DIR | --dry-run) [--config FILE] [--set k=v]... [--allow-tokenizer-change]
// [--json]`: Hugging Face
// LlamaForCausalLM interop (docs/interop.md). The commands parse arguments and claim the run dir (core/train's
// run-dir rule: interop sits below train and knows nothing of run dirs); the mapping and all checks live in
// core/interop/hf_llama.{h,cpp}.
#include <spdlog/spdlog.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/interop/hf_llama.h"
#include "core/train/run_dir.h"

namespace keel::cli {
namespace {

// Exactly `count` positional arguments, or a usage error naming how many came.
void require_positional(const Args& positional, size_t count, const std::string& usage_line) {
  if (positional.size() != count) {
    throw std::runtime_error("expected " + std::to_string(count) + " argument(s), got " +
                             std::to_string(positional.size()) + "; usage: " + usage_line);
  }
}

}  // namespace

int cmd_export_hf(const Args& args) {
  const std::string usage_line =
      "keel export-hf CKPT_DIR OUT_DIR [--dtype fp32|bf16] [--no-tokenizer] [--max-shard-size SIZE]";
  Args positional;
  std::string dtype = "fp32", max_shard_size = "5GB";
  po::options_description options("keel export-hf CKPT_DIR OUT_DIR");
  // clang-format off
  options.add_options()
      ("dtype", po::value<std::string>(&dtype), "fp32 (the masters, bit-exact; default) or bf16")
      ("no-tokenizer", "write no tokenizer.model / tokenizer_config.json (the data's tokenizer is not at hand)")
      ("max-shard-size", po::value<std::string>(&max_shard_size),
       "largest weights file (default 5GB, as transformers); above it: model-0000i-of-0000n.safetensors + "
       "model.safetensors.index.json. Units KB/MB/GB (10^3..) or KiB/MiB/GiB (2^10..), or bytes")
      ("help", "show this help");
  // clang-format on
  auto vm = parse_args(args, options, "export-hf", &positional);
  if (vm.count("help")) {
    std::cout << usage_line << "\n" << options;
    return 0;
  }
  require_positional(positional, 2, usage_line);
  if (dtype != "fp32" && dtype != "bf16") throw std::runtime_error("--dtype is '" + dtype + "', expected fp32 or bf16");
  interop::ExportOptions export_options;
  export_options.bf16 = dtype == "bf16";
  export_options.tokenizer = vm.count("no-tokenizer") == 0;
  export_options.max_shard_bytes = interop::parse_shard_size(max_shard_size, "--max-shard-size");
  std::cout << interop::export_hf(positional[0], positional[1], export_options) << "\n";
  return 0;
}

namespace {

// `keel import-hf --dry-run`: what the import would write, from config.json and the files' headers alone.
int print_import_plan(const interop::ImportPlan& plan, bool as_json) {
  const ModelConfig& m = plan.config.model;
  const int64_t largest = plan.largest_tensor_elements * 4, whole = plan.parameters * 4;
  if (as_json) {
    nlohmann::json tokenizer = nullptr;
    if (!plan.tokenizer_path.empty()) {
      tokenizer = {{"path", plan.tokenizer_path}, {"sha256", plan.tokenizer_sha256}, {"pieces", plan.tokenizer_pieces}};
    }
    std::cout << nlohmann::json{{"dry_run", true},
                                {"hf_dir", plan.hf_dir},
                                {"model",
                                 {{"layers", m.layers},
                                  {"d_model", m.d_model},
                                  {"heads", m.heads},
                                  {"kv_heads", m.kv_heads},
                                  {"ffn_hidden", m.ffn_hidden},
                                  {"vocab", m.vocab},
                                  {"tie_embeddings", m.tie_embeddings}}},
                                {"parameters", plan.parameters},
                                {"tensors", plan.weights.size()},
                                {"weight_files", plan.weight_files},
                                {"source_bytes", plan.source_bytes},
                                {"fp32_model_bytes", whole},
                                {"largest_tensor_fp32_bytes", largest},
                                {"max_position_embeddings", plan.max_position_embeddings},
                                {"seq_len", m.seq_len},
                                {"rope_theta", m.rope_theta},
                                {"vocab", m.vocab},
                                {"tokenizer", tokenizer},
                                {"notes", plan.notes}}
                     .dump()
              << "\n";
    return 0;
  }
  for (const auto& note : plan.notes) std::cout << note << "\n";
  std::cout << "dry run: " << plan.hf_dir << " is a LlamaForCausalLM of " << plan.parameters << " parameters ("
            << m.layers << " layers, d_model " << m.d_model << ", " << m.heads << " heads, " << m.kv_heads
            << " kv heads, ffn " << m.ffn_hidden << ", vocab " << m.vocab << ") in " << plan.weights.size()
            << " tensors of " << plan.weight_files << " file(s), " << plan.source_bytes << " bytes; fp32 masters "
            << whole << " bytes, the largest tensor " << largest
            << " bytes in fp32 (the import holds a few copies of it at a time, not the model); nothing written\n";
  return 0;
}

}  // namespace

int cmd_import_hf(const Args& args) {
  const std::string usage_line =
      "keel import-hf HF_DIR (--run-dir RUN_DIR | --dry-run) [--config FILE] [--set key=value]... "
      "[--allow-tokenizer-change] [--json]";
  Args positional;
  std::string run_dir;
  interop::ImportOptions import_options;
  import_options.config_path = "experiments/tiny.ini";
  po::options_description options("keel import-hf HF_DIR");
  // clang-format off
  options.add_options()
      ("run-dir", po::value<std::string>(&run_dir), "new run directory for the imported checkpoint")
      ("dry-run", "check config.json and every tensor's name and shape (the files' headers only, no tensor data; "
       "not the data), print the plan, write nothing")
      ("config", po::value<std::string>(&import_options.config_path),
       "INI config for the data/train/optim keys (default experiments/tiny.ini); model.* come from config.json")
      ("set", po::value<std::vector<std::string>>(&import_options.overrides)->composing(),
       "override a key: --set section.key=value (repeatable)")
      ("allow-tokenizer-change", "import although HF_DIR/tokenizer.model is not the prepared data's tokenizer")
      ("json", "print the result as one JSON object")
      ("help", "show this help");
  // clang-format on
  auto vm = parse_args(args, options, "import-hf", &positional);
  if (vm.count("help")) {
    std::cout << usage_line << "\n" << options;
    return 0;
  }
  require_positional(positional, 1, usage_line);
  const bool dry_run = vm.count("dry-run") > 0;
  if (dry_run == !run_dir.empty())
    throw std::runtime_error(
        std::string(dry_run ? "--dry-run writes nothing: drop --run-dir" : "--run-dir is required") +
        "; usage: " + usage_line);
  import_options.allow_tokenizer_change = vm.count("allow-tokenizer-change") > 0;
  import_options.check_data = !dry_run;
  if (vm.count("json")) spdlog::set_level(spdlog::level::warn);  // stdout carries the JSON object alone
  // Everything checked before the run dir is claimed; a write that fails after the claim leaves nothing behind.
  const interop::ImportPlan plan = interop::plan_import(positional[0], import_options);
  if (dry_run) return print_import_plan(plan, vm.count("json") > 0);
  const train::RunDirClaim claim = train::create_run_dir(run_dir, /*force=*/false);  // locked until the end
  const train::RunPaths& paths = claim.paths;
  std::string dir;
  try {
    dir = interop::write_import(plan, {run_dir, paths.config_ini(), paths.lineage_json(), paths.checkpoints()});
  } catch (...) {
    train::remove_unstarted_run(claim);
    throw;
  }
  const std::string next = "keel resume --from " + run_dir + " --run-dir NEW_DIR --allow-data-change";
  if (vm.count("json")) {
    nlohmann::json tokenizer = nullptr;
    if (!plan.tokenizer_path.empty()) {
      tokenizer = {{"path", plan.tokenizer_path}, {"sha256", plan.tokenizer_sha256}, {"pieces", plan.tokenizer_pieces}};
    }
    std::cout << nlohmann::json{{"checkpoint", dir},
                                {"run_dir", run_dir},
                                {"max_position_embeddings", plan.max_position_embeddings},
                                {"seq_len", plan.config.model.seq_len},
                                {"rope_theta", plan.config.model.rope_theta},
                                {"vocab", plan.config.model.vocab},
                                {"tokenizer", tokenizer},
                                {"notes", plan.notes},
                                {"continue_with", next}}
                     .dump()
              << "\n";
    return 0;
  }
  for (const auto& note : plan.notes) std::cout << note << "\n";
  std::cout << "imported " << positional[0] << " as " << dir << "\n"
            << "continue with: " << next << "\n";
  return 0;
}

}  // namespace keel::cli

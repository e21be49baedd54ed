// Why: `keel export-hf CKPT_DIR OUT_DIR [--dtype fp32|bf16]` and `keel import-hf HF_DIR --run-dir RUN_DIR
// [--config FILE] [--set k=v]...`: Hugging Face LlamaForCausalLM interop (docs/interop.md). The commands only
// parse arguments; the mapping and all checks live in core/interop/hf_llama.{h,cpp}.
#include <iostream>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/interop/hf_llama.h"

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
  const std::string usage_line = "keel export-hf CKPT_DIR OUT_DIR [--dtype fp32|bf16]";
  Args positional;
  std::string dtype = "fp32";
  po::options_description options("keel export-hf CKPT_DIR OUT_DIR");
  // clang-format off
  options.add_options()
      ("dtype", po::value<std::string>(&dtype), "fp32 (the masters, bit-exact; default) or bf16")
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
  std::cout << interop::export_hf(positional[0], positional[1], export_options) << "\n";
  return 0;
}

int cmd_import_hf(const Args& args) {
  const std::string usage_line = "keel import-hf HF_DIR --run-dir RUN_DIR [--config FILE] [--set key=value]...";
  Args positional;
  std::string run_dir;
  interop::ImportOptions import_options;
  import_options.config_path = "experiments/tiny.ini";
  po::options_description options("keel import-hf HF_DIR");
  // clang-format off
  options.add_options()
      ("run-dir", po::value<std::string>(&run_dir)->required(), "new run directory for the imported checkpoint")
      ("config", po::value<std::string>(&import_options.config_path),
       "INI config for the data/train/optim keys (default experiments/tiny.ini); model.* come from config.json")
      ("set", po::value<std::vector<std::string>>(&import_options.overrides)->composing(),
       "override a key: --set section.key=value (repeatable)")
      ("help", "show this help");
  // clang-format on
  auto vm = parse_args(args, options, "import-hf", &positional);
  if (vm.count("help")) {
    std::cout << usage_line << "\n" << options;
    return 0;
  }
  require_positional(positional, 1, usage_line);
  const std::string dir = interop::import_hf(positional[0], run_dir, import_options);
  std::cout << "imported " << positional[0] << " as " << dir << "\n"
            << "continue with: keel resume --from " << run_dir << " --run-dir NEW_DIR --allow-data-change\n";
  return 0;
}

}  // namespace keel::cli

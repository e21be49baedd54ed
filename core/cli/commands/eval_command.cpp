// Why: `keel eval CKPT_DIR|RUN_DIR [--out FILE.h5] [--set k=v]... [--batches N] [--memorization-samples N] [--json]`
// measures a checkpoint (docs/eval.md): per-source NLL/perplexity on each source's eval
// samples and the Analysis360 memorization score on the training sequences it consumed. The results go to
// an HDF5 file that is never inside the checkpoint directory (its manifest lists every file it holds):
// RUN_DIR/eval/step-XXXXXXXX.h5 by default, which needs the checkpoint to sit in RUN_DIR/checkpoints/.
#include <torch/torch.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/eval/eval.h"
#include "core/train/run_dir.h"

namespace keel::cli {

int cmd_eval(const Args& args) {
  namespace fs = std::filesystem;
  std::vector<std::string> positional, overrides;
  std::string out;
  int64_t batches = 8, memorization_samples = 8;
  po::options_description options("keel eval CKPT_DIR|RUN_DIR");
  // clang-format off
  options.add_options()
      ("out", po::value<std::string>(&out), "HDF5 file to write (default RUN_DIR/eval/step-XXXXXXXX.h5)")
      ("set", po::value<std::vector<std::string>>(&overrides)->composing(),
       "override a key of the checkpoint's config (e.g. data.dir)")
      ("batches", po::value<int64_t>(&batches), "eval batches (of train.micro_batch samples) per source (default 8)")
      ("memorization-samples", po::value<int64_t>(&memorization_samples),
       "training sequences per (source, chunk) (default 8)")
      ("json", "print the results as one JSON object (docs/cli.md)")
      ("help", "show this help");
  // clang-format on
  const po::variables_map vm = parse_args(args, options, "eval", &positional);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (positional.size() != 1) throw std::runtime_error("expected one CKPT_DIR or RUN_DIR (see keel eval --help)");
  if (batches < 1) throw std::runtime_error("--batches must be >= 1, got " + std::to_string(batches));
  if (memorization_samples < 0) throw std::runtime_error("--memorization-samples must be >= 0");

  // The checkpoint (verified) and where the results go.
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(positional[0]);
  for (const auto& w : ckpt.warnings) std::cerr << "keel eval: warning: " << w << "\n";
  const fs::path ckpt_dir = fs::weakly_canonical(ckpt.dir);
  if (out.empty()) {
    if (ckpt_dir.parent_path().filename() != "checkpoints") {
      throw std::runtime_error(ckpt.dir + " is not inside RUN_DIR/checkpoints/: pass --out FILE.h5");
    }
    out = (ckpt_dir.parent_path().parent_path() / "eval" / (checkpoint::step_dir_name(ckpt.manifest.step) + ".h5"))
              .string();
  }
  const fs::path out_path = fs::weakly_canonical(out);
  if (out_path.string().rfind(ckpt_dir.string() + "/", 0) == 0) {
    throw std::runtime_error("--out " + out + " is inside the checkpoint " + ckpt.dir +
                             " (that would break its manifest)");
  }
  if (fs::exists(out_path)) throw std::runtime_error(out + ": exists (remove it or pass another --out)");
  // Writing into a run dir: hold its lock while evaluating, so a live run (or one starting) is never written
  // into by two processes; a run dir in use is refused naming the pid.
  std::unique_ptr<train::RunDirLock> run_dir_lock;
  for (fs::path dir = out_path.parent_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
    if (!fs::exists(train::RunPaths{dir.string()}.marker_file())) continue;
    try {
      run_dir_lock = train::RunDirLock::acquire(dir.string());
    } catch (const train::RunDirError& e) {
      throw std::runtime_error("--out " + out + ": " + e.what());
    }
    break;
  }

  const Config config = load_config(ckpt.dir + "/config.ini", overrides);
  if (config.train.threads > 0) torch::set_num_threads(static_cast<int>(config.train.threads));
  const checkpoint::TrainingState state = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1);  // placeholders
  const eval::EvalReport report =
      eval::evaluate_checkpoint(config, state, ckpt.dir, ckpt.manifest.step, {batches, memorization_samples});
  eval::write_report(out_path.string(), report);
  if (vm.count("json")) {
    std::cout << eval::report_json(report, out_path.string()).dump(2) << "\n";
  } else {
    std::cout << eval::format_report(report) << "\nwrote " << out_path.string() << "\n";
  }
  return 0;
}

}  // namespace keel::cli

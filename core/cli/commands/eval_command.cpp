// Why: `keel eval CKPT_DIR|RUN_DIR [--out FILE.h5] [--set k=v]... [--split S] [--batches N] [--memorization-samples N]
// [--json]` measures a checkpoint (docs/eval.md): per-source NLL/perplexity on each source's eval samples (its
// held-out set by default) and the Analysis360 memorization score on the training sequences it consumed;
// `keel eval --all RUN_DIR` does so for every checkpoint and writes the curve (RUN_DIR/eval/curve.h5). The results go
// to an HDF5 file that is never inside the checkpoint directory (its manifest lists every file it holds):
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

namespace {

namespace fs = std::filesystem;

// Writing into a run dir: hold its lock while evaluating, so a live run (or one starting) is never written
// into by two processes; a run dir in use is refused naming the pid.
std::unique_ptr<train::RunDirLock> lock_run_dir_of(const fs::path& out_path, const std::string& out) {
  for (fs::path dir = out_path.parent_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
    if (!fs::exists(train::RunPaths{dir.string()}.marker_file())) continue;
    try {
      return train::RunDirLock::acquire(dir.string());
    } catch (const train::RunDirError& e) {
      throw std::runtime_error("--out " + out + ": " + e.what());
    }
  }
  return nullptr;
}

eval::EvalReport evaluate(const checkpoint::ResolvedCheckpoint& ckpt, const std::vector<std::string>& overrides,
                          const eval::EvalOptions& options) {
  const Config config = load_config(ckpt.dir + "/config.ini", overrides);
  if (config.train.threads > 0) torch::set_num_threads(static_cast<int>(config.train.threads));
  const checkpoint::TrainingState state = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1);  // placeholders
  return eval::evaluate_checkpoint(config, state, ckpt.dir, ckpt.manifest.step, options);
}

// `keel eval --all RUN_DIR`: every valid checkpoint, oldest first, into one curve file.
int eval_all(const std::string& run_dir, std::string out, const std::vector<std::string>& overrides,
             const eval::EvalOptions& options, bool json) {
  if (checkpoint::names_checkpoint_dir(run_dir))
    throw std::runtime_error("--all takes a RUN_DIR, not the checkpoint " + run_dir);
  const checkpoint::CheckpointStore store((fs::path(run_dir) / "checkpoints").string());
  const std::vector<checkpoint::CheckpointEntry> entries = store.list_valid();
  if (entries.empty()) throw std::runtime_error(run_dir + ": no valid checkpoint in " + store.root());
  if (out.empty()) out = (fs::path(run_dir) / "eval" / "curve.h5").string();
  const fs::path out_path = fs::weakly_canonical(out);
  const std::unique_ptr<train::RunDirLock> lock = lock_run_dir_of(out_path, out);
  std::vector<eval::EvalReport> reports;
  for (const auto& entry : entries) {
    const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(entry.dir);
    reports.push_back(evaluate(ckpt, overrides, options));
    if (!json) std::cout << eval::format_report(reports.back()) << "\n";
  }
  eval::write_curve(out_path.string(), run_dir, reports);
  if (json) {
    std::cout << eval::curve_json(run_dir, reports, out_path.string()).dump(2) << "\n";
  } else {
    std::cout << "wrote " << out_path.string() << " (" << reports.size() << " checkpoints)\n";
  }
  return 0;
}

}  // namespace

int cmd_eval(const Args& args) {
  std::vector<std::string> positional, overrides;
  std::string out, split = "auto";
  int64_t batches = 8, memorization_samples = 8;
  po::options_description options("keel eval CKPT_DIR|RUN_DIR  |  keel eval --all RUN_DIR");
  // clang-format off
  options.add_options()
      ("out", po::value<std::string>(&out),
       "HDF5 file to write (default RUN_DIR/eval/step-XXXXXXXX.h5; with --all RUN_DIR/eval/curve.h5)")
      ("set", po::value<std::vector<std::string>>(&overrides)->composing(),
       "override a key of the checkpoint's config (e.g. data.dir)")
      ("split", po::value<std::string>(&split),
       "heldout (documents prepare kept out of training), train-tail (the end of each source's epoch-0 order) or "
       "auto (default: heldout when every source has one)")
      ("all", "evaluate every valid checkpoint of RUN_DIR and write their curve (docs/eval.md)")
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
  eval::EvalOptions eval_options{batches, memorization_samples};
  try {
    eval_options.split = eval::parse_split(split);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(e.what());
  }
  if (vm.count("all")) return eval_all(positional[0], out, overrides, eval_options, vm.count("json") > 0);

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
  const std::unique_ptr<train::RunDirLock> run_dir_lock = lock_run_dir_of(out_path, out);

  const eval::EvalReport report = evaluate(ckpt, overrides, eval_options);
  eval::write_report(out_path.string(), report);
  if (vm.count("json")) {
    std::cout << eval::report_json(report, out_path.string()).dump(2) << "\n";
  } else {
    std::cout << eval::format_report(report) << "\nwrote " << out_path.string() << "\n";
  }
  return 0;
}

}  // namespace keel::cli

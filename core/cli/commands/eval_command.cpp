// Why: `keel eval CKPT_DIR|RUN_DIR [--out FILE.h5] [--set k=v]... [--batches N] [--memorization-samples N]`
// measures a checkpoint (docs/eval.md): per-source NLL/perplexity on each source's eval
// samples and the Analysis360 memorization score on the training sequences it consumed. The results go to
// an HDF5 file that is never inside the checkpoint directory (its manifest lists every file it holds):
// RUN_DIR/eval/step-XXXXXXXX.h5 by default, which needs the checkpoint to sit in RUN_DIR/checkpoints/.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <set>

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
  const checkpoint::TrainingState state = checkpoint::read_full_state(ckpt.dir, ckpt.manifest, -1);
  const model::Llama model = eval::load_model(config, state, ckpt.dir);
  data::DataLoader loader(config, config.global_batch());
  const std::vector<data::SampleRef> consumed = eval::consumed_samples(loader, state.data_ledger);

  eval::EvalReport report;
  report.checkpoint_dir = ckpt.dir;
  report.step = ckpt.manifest.step;
  report.source_names = loader.source_names();

  // 1. Per-source NLL / perplexity on the eval samples.
  const int64_t batch = config.train.micro_batch;
  for (int32_t src = 0; src < static_cast<int32_t>(report.source_names.size()); ++src) {
    eval::SourcePerplexity p;
    p.source = report.source_names[static_cast<size_t>(src)];
    p.sample_ids = eval::eval_sample_ids(config.data.seed, p.source, loader.samples_per_epoch(src), batches * batch);
    const int64_t n = static_cast<int64_t>(p.sample_ids.size());
    torch::Tensor windows = torch::empty({n, loader.seq_len() + 1}, torch::kInt64);  // [N, T+1]
    for (int64_t i = 0; i < n; ++i) {
      const std::vector<int32_t> tokens = loader.sample_tokens(src, p.sample_ids[static_cast<size_t>(i)]);
      windows[i].copy_(torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.end()), torch::kInt64));
    }
    p.sample_nll = eval::window_nll(model, windows, batch);
    double sum = 0.0;
    for (double v : p.sample_nll) sum += v;
    p.tokens = n * loader.seq_len();
    p.mean_nll = n ? sum / static_cast<double>(n) : 0.0;  // every window has T targets: token-weighted
    p.perplexity = std::exp(p.mean_nll);
    std::set<int64_t> trained_on;  // this source's sample ids the checkpoint consumed
    for (const auto& s : consumed) {
      if (s.source == src) trained_on.insert(s.sample_id);
    }
    for (int64_t id : p.sample_ids) p.seen_in_training += trained_on.count(id) ? 1 : 0;
    report.perplexity.push_back(std::move(p));
  }

  // 2. Memorization on consumed training sequences.
  std::vector<eval::TrainingSequence> sequences;
  for (const auto& s : eval::pick_memorization_samples(consumed, memorization_samples)) {
    sequences.push_back({s.source, s.sample_id, s.chunk, loader.sample_tokens(s.source, s.sample_id)});
  }
  report.memorization_options.batch = batch;
  report.memorization =
      eval::score_memorization(sequences, eval::greedy_next_token(model), report.memorization_options);
  report.memorization_summary =
      eval::summarize_memorization(report.memorization, static_cast<int32_t>(report.source_names.size()));

  eval::write_report(out_path.string(), report);
  std::cout << eval::format_report(report) << "\nwrote " << out_path.string() << "\n";
  return 0;
}

}  // namespace keel::cli

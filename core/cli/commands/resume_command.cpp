// Why: `keel resume --from RUN_DIR|CKPT_DIR --run-dir NEW_DIR [--set k=v]... [--allow-data-change]` continues a
// run from a checkpoint, exactly when nothing changes and as a recorded branch when something does. All the
// refusals happen here, in this order, before any tensor is read and before NEW_DIR is claimed:
//   1. the checkpoint is verified (manifest + SHA-256 of every file); from a run dir, a damaged newest
//      checkpoint is passed over with a warning, never silently replaced by step 0;
//   2. the config is the checkpoint's own config.ini plus --set overrides; a change to any model.* key is
//      refused with the key named (weights of another shape cannot be loaded);
//   3. the data must be the data the checkpoint was trained on: a different vocab or tokenizer is refused, a
//      different corpus (shard sizes, EOS id) only with --allow-data-change, which the lineage records.
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/checkpoint/training_state.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/cli/commands/run_launcher.h"
#include "core/config/memory_estimate.h"
#include "core/parallel/rendezvous.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;
using checkpoint::CheckpointError;
using nlohmann::json;

std::string value_of(const std::vector<std::pair<std::string, std::string>>& flat, const std::string& key) {
  for (const auto& [k, v] : flat) {
    if (k == key) return v;
  }
  return "(unset)";
}

// Differences between two data fingerprints, as "field: checkpoint -> now" lines; `hard` gets the ones no flag
// can override (vocab, tokenizer).
std::vector<std::string> fingerprint_differences(const json& was, const json& now, std::vector<std::string>& hard) {
  std::vector<std::string> soft;
  for (const char* key : {"vocab", "tokenizer", "eos_id", "prepared"}) {
    const json a = was.value(key, json()), b = now.value(key, json());
    if (a == b) continue;
    const std::string line = std::string("data ") + key + ": checkpoint " + a.dump() + ", now " + b.dump();
    (std::string(key) == "vocab" || std::string(key) == "tokenizer" ? hard : soft).push_back(line);
  }
  const json a = was.value("sources", json::array()), b = now.value("sources", json::array());
  if (a != b) soft.push_back("data sources (names or shard sizes): checkpoint " + a.dump() + ", now " + b.dump());
  return soft;
}

}  // namespace

int cmd_resume(const Args& args) {
  std::string from, run_dir;
  std::vector<std::string> overrides, plugins, plugin_args;
  po::options_description options("keel resume");
  add_plugin_options(options, plugins, plugin_args);
  options.add_options()("from", po::value<std::string>(&from)->required(),
                        "a run dir (its latest valid checkpoint) or a checkpoint dir")(
      "run-dir", po::value<std::string>(&run_dir)->required(),
      "new directory for this run (never the one resumed from)")(
      "set", po::value<std::vector<std::string>>(&overrides)->composing(),
      "override a key: --set section.key=value (repeatable)")(
      "allow-data-change", "accept data that differs from the checkpoint's (recorded in the lineage)")(
      "force", "replace an existing run in --run-dir")("help", "show this help");
  auto vm = parse_args(args, options, "resume");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  const bool allow_data_change = vm.count("allow-data-change") > 0;
  append_plugin_overrides(plugins, plugin_args, overrides);

  // 1. Which checkpoint; verified.
  checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(from);
  for (const auto& w : ckpt.warnings) std::cerr << "keel resume: warning: " << w << "\n";
  const fs::path target = fs::weakly_canonical(run_dir);
  const fs::path source = fs::weakly_canonical(ckpt.dir);
  if (source.string().rfind(target.string() + "/", 0) == 0 || source == target) {
    throw std::runtime_error("--run-dir " + run_dir + " contains the checkpoint being resumed (" + ckpt.dir +
                             "): resume into a new directory");
  }

  // 2. Config: the checkpoint's, plus overrides; the model must not change.
  const std::string ckpt_config = ckpt.dir + "/config.ini";
  const Config parent = load_config(ckpt_config);
  Config config = load_config(ckpt_config, overrides);
  check_memory_fits(config);  // an absurd model size, before any tensor is read
  const auto parent_flat = flatten(parent), flat = flatten(config);
  for (const auto& [key, value] : flat) {
    if (key.rfind("model.", 0) != 0) continue;
    const std::string was = value_of(parent_flat, key);
    if (was != value) {
      throw CheckpointError(ckpt.dir + ": " + key + " differs: checkpoint " + was + ", requested " + value +
                            " (a checkpoint resumes only into the same model shape)");
    }
    const auto it = ckpt.manifest.model.find(key);
    if (it != ckpt.manifest.model.end() && it->second != value) {
      throw CheckpointError(ckpt.dir + ": manifest " + key + " = " + it->second + " but its config.ini says " + value);
    }
  }
  if (config.global_batch() != parent.global_batch()) {
    throw CheckpointError(ckpt.dir + ": the global batch (train.micro_batch x train.grad_accum) differs: checkpoint " +
                          std::to_string(parent.global_batch()) + ", requested " +
                          std::to_string(config.global_batch()) + " (the data order is defined per global batch)");
  }
  if (config.train.device == "cuda" && !torch::cuda::is_available())
    throw std::runtime_error("train.device = cuda but no CUDA device is available to this build of keel");

  // 3. Data.
  auto loader = std::make_unique<data::DataLoader>(config, config.global_batch());
  std::vector<std::string> hard;
  const std::vector<std::string> soft =
      fingerprint_differences(json::parse(ckpt.manifest.data_fingerprint), loader->fingerprint(), hard);
  if (!hard.empty()) {
    std::string message = ckpt.dir + ": the checkpoint was trained with another vocabulary or tokenizer:";
    for (const auto& h : hard) message += "\n  " + h;
    throw CheckpointError(message);
  }
  if (!soft.empty() && !allow_data_change) {
    std::string message =
        ckpt.dir + ": the data differs from the checkpoint's (pass --allow-data-change to accept it):";
    for (const auto& s : soft) message += "\n  " + s;
    throw CheckpointError(message);
  }

  // 4. Tensors: every rank file read (every object checked) and reassembled whole before the run dir is
  // claimed, so that any DP x TP x PP layout can take its shards. Each rank's RNG continues exactly when the
  // layout is unchanged; after a layout change the generators keep their fresh per-rank seeding.
  const checkpoint::Layout& saved = ckpt.manifest.layout;
  const bool same_layout =
      saved.dp == config.parallel.dp && saved.tp == config.parallel.tp && saved.pp == config.parallel.pp;
  const int64_t rank = parallel::detect_world().rank;
  const checkpoint::TrainingState state = checkpoint::read_full_state(ckpt.dir, ckpt.manifest, same_layout ? rank : -1);
  if (!same_layout) {
    spdlog::info("resharding: checkpoint layout dp={} tp={} pp={} -> dp={} tp={} pp={}", saved.dp, saved.tp, saved.pp,
                 config.parallel.dp, config.parallel.tp, config.parallel.pp);
  }

  RunRequest request;
  request.lineage.parent_run_id = ckpt.manifest.run_id;
  request.lineage.parent_checkpoint = ckpt.dir;
  request.lineage.parent_step = ckpt.manifest.step;
  try {
    request.lineage.parent_run_dir = checkpoint::parse_lineage(ckpt.manifest.lineage, ckpt.dir).run_dir;
  } catch (const CheckpointError&) {
    request.lineage.parent_run_dir = fs::path(ckpt.dir).parent_path().parent_path().string();
  }
  request.lineage.changes = checkpoint::diff_configs(parent_flat, flat);
  const int64_t decay_was = parent.lr_decay_steps();
  const int64_t decay_now = config.lr_decay_steps();
  if (decay_was != decay_now) {
    request.lineage.changes.push_back(
        {"lr_schedule.decay_steps", std::to_string(decay_was), std::to_string(decay_now)});
    spdlog::warn(
        "the LR schedule's length changes from {} to {} steps (optim.decay_steps = 0 follows train.steps); "
        "set optim.decay_steps to keep it",
        decay_was, decay_now);
  }
  for (const auto& w : ckpt.warnings) request.lineage.notes.push_back(w);
  request.lineage.data_change_allowed = allow_data_change && !soft.empty();
  request.config = std::move(config);
  request.loader = std::move(loader);
  request.run_dir = run_dir;
  request.force = vm.count("force") > 0;
  request.resume = &state;
  request.allow_data_change = allow_data_change;
  request.description = "resume: from " + ckpt.dir + " (step " + std::to_string(ckpt.manifest.step) + ")";
  return launch_run(std::move(request));
}

}  // namespace keel::cli

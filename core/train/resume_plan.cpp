// Why: see resume_plan.h.
#include "core/train/resume_plan.h"

#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/resharding.h"
#include "core/config/batch_schedule.h"
#include "core/config/memory_estimate.h"
#include "core/parallel/rendezvous.h"

namespace keel::train {
namespace {

namespace fs = std::filesystem;
using checkpoint::CheckpointError;
using nlohmann::json;
using FlatConfig = std::vector<std::pair<std::string, std::string>>;

std::string value_of(const FlatConfig& flat, const std::string& key) {
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

// 2. The model must not change (the manifest's model keys agree with its config.ini).
void check_same_shape(const checkpoint::ResolvedCheckpoint& ckpt, const FlatConfig& parent_flat,
                      const FlatConfig& flat) {
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
}

// The global batch may change at a resume: the data ledger continues from its next sample (docs/data.md), and the
// trainer records the change in the lineage. Said here, before anything is read.
void say_batch_change(const checkpoint::ResolvedCheckpoint& ckpt, const Config& parent, const Config& config) {
  const int64_t step = ckpt.manifest.step;
  const int64_t was = batch_at(batch_stages(parent), step), now = batch_at(batch_stages(config), step);
  if (was != now || parent.train.batch_schedule != config.train.batch_schedule) {
    spdlog::info("the global batch from step {} is {} sequences (the checkpoint's config: {}){}", step, now, was,
                 config.train.batch_schedule.empty() ? "" : "; train.batch_schedule " + config.train.batch_schedule);
  }
}

// 3. The data: a hard difference is refused, a soft one only without allow_data_change. Returns the soft ones.
std::vector<std::string> check_same_data(const checkpoint::ResolvedCheckpoint& ckpt, const data::DataLoader& loader,
                                         bool allow_data_change) {
  std::vector<std::string> hard;
  const std::vector<std::string> soft =
      fingerprint_differences(json::parse(ckpt.manifest.data_fingerprint), loader.fingerprint(), hard);
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
  return soft;
}

// The new branch's lineage: its parent, what changed (config keys, the LR schedule's length), the warnings.
checkpoint::Lineage branch_lineage(const checkpoint::ResolvedCheckpoint& ckpt, const Config& parent,
                                   const Config& config, const FlatConfig& parent_flat, const FlatConfig& flat) {
  checkpoint::Lineage lineage;
  lineage.parent_run_id = ckpt.manifest.run_id;
  lineage.parent_checkpoint = ckpt.dir;
  lineage.parent_step = ckpt.manifest.step;
  try {
    lineage.parent_run_dir = checkpoint::parse_lineage(ckpt.manifest.lineage, ckpt.dir).run_dir;
  } catch (const CheckpointError&) {
    lineage.parent_run_dir = fs::path(ckpt.dir).parent_path().parent_path().string();
  }
  lineage.changes = checkpoint::diff_configs(parent_flat, flat);
  const int64_t decay_was = parent.lr_decay_steps();
  const int64_t decay_now = config.lr_decay_steps();
  if (decay_was != decay_now) {
    lineage.changes.push_back({"lr_schedule.decay_steps", std::to_string(decay_was), std::to_string(decay_now)});
    spdlog::warn(
        "the LR schedule's length changes from {} to {} steps (optim.decay_steps = 0 follows train.steps); "
        "set optim.decay_steps to keep it",
        decay_was, decay_now);
  }
  for (const auto& w : ckpt.warnings) lineage.notes.push_back(w);
  return lineage;
}

}  // namespace

ResumePlan plan_resume(const checkpoint::ResolvedCheckpoint& ckpt, const std::string& run_dir,
                       const std::vector<std::string>& overrides, bool allow_data_change) {
  const fs::path target = fs::weakly_canonical(run_dir);
  const fs::path source = fs::weakly_canonical(ckpt.dir);
  if (source.string().rfind(target.string() + "/", 0) == 0 || source == target) {
    throw std::runtime_error("--run-dir " + run_dir + " contains the checkpoint being resumed (" + ckpt.dir +
                             "): resume into a new directory");
  }

  // 2. Config: the checkpoint's, plus overrides; the model must not change.
  const std::string ckpt_config = ckpt.dir + "/config.ini";
  const Config parent = load_config(ckpt_config);
  ResumePlan plan;
  plan.config = load_config(ckpt_config, overrides);
  check_memory_fits(plan.config);  // an absurd model size, before any tensor is read
  const FlatConfig parent_flat = flatten(parent), flat = flatten(plan.config);
  check_same_shape(ckpt, parent_flat, flat);
  say_batch_change(ckpt, parent, plan.config);
  if (plan.config.train.device == Device::kCuda && !torch::cuda::is_available())
    throw std::runtime_error("train.device = cuda but no CUDA device is available to this build of keel");

  // 3. Data.
  plan.loader = std::make_unique<data::DataLoader>(plan.config, plan.config.global_batch());
  const std::vector<std::string> soft = check_same_data(ckpt, *plan.loader, allow_data_change);

  // 4. Tensors: every rank file's metadata read (every object checked, every tensor's pieces cover it) before the
  // run dir is claimed; the tensors are placeholders (checkpoint::read_lazy_state), and the trainer reads only
  // this rank's shards of them, so that any DP x TP x PP layout resumes without the whole model in memory. Each
  // rank's RNG continues exactly when the layout is unchanged; after a layout change the generators keep their
  // fresh per-rank seeding.
  const checkpoint::Layout& saved = ckpt.manifest.layout;
  const ParallelConfig& now = plan.config.parallel;
  const bool same_layout = saved.dp == now.dp && saved.tp == now.tp && saved.pp == now.pp;
  const int64_t rank = parallel::detect_world().rank;
  plan.state = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, same_layout ? rank : -1);
  if (!same_layout) {
    spdlog::info("resharding: checkpoint layout dp={} tp={} pp={} -> dp={} tp={} pp={}", saved.dp, saved.tp, saved.pp,
                 now.dp, now.tp, now.pp);
  }
  plan.lineage = branch_lineage(ckpt, parent, plan.config, parent_flat, flat);
  plan.lineage.data_change_allowed = allow_data_change && !soft.empty();
  return plan;
}

}  // namespace keel::train

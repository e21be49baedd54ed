// Why: see checkpointer.h.
#include "core/train/checkpointer.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_writer.h"
#include "core/checkpoint/json_fields.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/io/hdf5.h"
#include "core/train/async_saver.h"
#include "core/train/moment_scales.h"
#include "core/train/plugin_continuity.h"
#include "core/train/skip_rules.h"

namespace keel::train {
namespace {

constexpr int64_t kMaxRollbacks = 100;  // a spike handler that keeps rolling back is a bug, not a recovery

// This rank's part of a checkpoint: its shards (model tensors from DP rank 0; TP-replicated ones from TP rank 0
// only, so that every element is written once), its optimizer state (all of it, or its ZeRO-1 share), and the
// LR schedule and plugin states, identical on every rank. RNG, ledger, config and lineage are added by the caller.
checkpoint::TrainingState capture_rank_state(TrainerState& s, int64_t step) {
  const Config& c = s.config;
  const parallel::ProcessGroups& g = s.groups;
  checkpoint::TrainingState st;
  st.step = step;
  st.tokens_seen = s.tokens_seen;
  auto writes = [&](size_t i) { return s.specs[i].sharded() || g.coords.tp == 0; };
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < s.params.size(); ++i) {
    index_of[s.params[i].name] = i;
    if (g.coords.dp != 0 || !writes(i)) continue;
    const auto& p = s.params[i];
    st.model.emplace_back(p.name, p.param.detach());
    st.placement["model/" + p.name] = {model::global_shape(p.param.sizes(), s.specs[i], g.layout.tp()),
                                       model::shard_offset(p.param.sizes(), s.specs[i], g.coords.tp)};
  }
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  const sdk::PluginState optimizer_state = optimizer.object->save_state();
  st.optimizer_name = optimizer.name();
  st.optimizer_json = optimizer_state.json;
  st.optimizer_step = sdk::json_int(optimizer_state.json, "step", 0);
  for (const auto& [name, tensor] : optimizer_state.tensors) {
    // "<param>/<state>": placed like its parameter when it has the parameter's shape.
    const auto slash = name.rfind('/');
    const auto it = slash == std::string::npos ? index_of.end() : index_of.find(name.substr(0, slash));
    if (it == index_of.end())
      throw checkpoint::CheckpointError("optimizer state tensor '" + name + "' names no parameter");
    const size_t i = it->second;
    if ((!s.zero_enabled() && g.coords.dp != 0) || !writes(i)) continue;
    st.optimizer.emplace_back(name, tensor);
    if (tensor.sizes() == s.params[i].param.sizes()) {
      st.placement["optimizer/" + name] = {model::global_shape(tensor.sizes(), s.specs[i], g.layout.tp()),
                                           model::shard_offset(tensor.sizes(), s.specs[i], g.coords.tp)};
    }
  }
  st.lr_schedule = checkpoint::lr_schedule_json(c, step, s.lr_factor, s.lr_factor_until);
  for (plugin_host::LoadedPlugin* p : s.plugins->all()) {
    if (p == &optimizer) continue;
    sdk::PluginState ps = p->object->save_state();
    st.plugins.push_back({p->slot, p->name(), p->description.version, ps.json, ps.tensors});
  }
  return st;
}

// The state of every loaded plugin except the optimizer, matched by slot and name; notes for the lineage say
// which start fresh and which of the checkpoint's are not loaded now.
void restore_plugin_states(TrainerState& s, const checkpoint::TrainingState& st, std::vector<std::string>& notes) {
  using checkpoint::CheckpointError;
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  std::vector<plugin_host::LoadedPlugin*> fresh;  // not in the checkpoint: warm started below
  for (plugin_host::LoadedPlugin* p : s.plugins->all()) {
    if (p == &optimizer) continue;
    bool found = false;
    for (const auto& ps : st.plugins) {
      if (ps.slot != p->slot || ps.name != p->name()) continue;
      found = true;
      try {
        p->object->load_state({ps.json, ps.tensors});
      } catch (const std::exception& e) {
        throw CheckpointError("plugin " + p->name() + " cannot load its checkpointed state: " + e.what());
      }
    }
    if (!found) {
      notes.push_back("plugin " + p->name() + " (" + p->slot + ") starts fresh: not in the checkpoint");
      fresh.push_back(p);
    }
  }
  for (const auto& ps : st.plugins) {
    bool loaded = false;
    for (plugin_host::LoadedPlugin* p : s.plugins->all())
      loaded = loaded || (p->slot == ps.slot && p->name() == ps.name);
    if (!loaded) notes.push_back("plugin " + ps.name + " (" + ps.slot + ") of the checkpoint is not loaded now");
  }
  // Libraries changed since the checkpoint (warnings), and the parent's history for the fresh ones.
  continue_plugins_after_resume(s, st, fresh);
}

// Every rank's result of writing its file ("" = written); throws, on every rank, unless all are empty. Rank 0
// removes the .tmp: no rank commits, and the previous checkpoint stays the latest.
void commit_none_unless_all_wrote(TrainerState& s, int64_t step, const std::string& tmp, const std::string& error) {
  const parallel::ProcessGroups& g = s.groups;
  const std::vector<std::string> errors = g.world->all_gather_strings(error);
  for (size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty()) continue;
    const auto latest = s.rank0() ? s.checkpoints->latest_pointer() : std::nullopt;
    std::error_code ec;
    if (s.rank0()) std::filesystem::remove_all(tmp, ec);
    throw checkpoint::CheckpointError("checkpoint step " + std::to_string(step) + " was not committed by any rank: " +
                                      g.layout.describe_rank(static_cast<int64_t>(r)) + " could not write its file: " +
                                      errors[r] + (latest ? "; the latest checkpoint is still " + *latest : ""));
  }
}

// Rank 0 writes config.ini and commits the rank files every rank wrote into save.tmp (manifest, rename, latest;
// `known`: digests their writers computed), then prunes; every rank learns the directory or the error.
std::string commit_and_prune(TrainerState& s, const PendingSave& save,
                             const std::map<std::string, checkpoint::FileDigest>& known, bool background) {
  const parallel::ProcessGroups& g = s.groups;
  const Config& c = s.config;
  const auto commit_start = std::chrono::steady_clock::now();
  std::string dir, error;
  if (s.rank0()) {
    try {
      {
        std::ofstream out(save.tmp + "/config.ini", std::ios::binary);
        out << save.config_ini;
        out.close();  // a full disk shows at the flush
        if (!out) throw checkpoint::CheckpointError(save.tmp + "/config.ini: write failed: " + std::strerror(errno));
      }
      const checkpoint::Manifest manifest =
          checkpoint::run_manifest(save.config, save.config_ini, s.lineage.run_id, io::utc_now_iso8601(),
                                   {g.layout.dp(), g.layout.tp(), g.layout.pp()}, save.data_fingerprint, save.lineage);
      std::vector<std::pair<std::string, int64_t>> files;
      for (int64_t r = 0; r < g.world_size(); ++r) files.emplace_back(checkpoint::rank_file_name(r), r);
      files.emplace_back("config.ini", -1);
      dir = s.checkpoints->commit(save.step, manifest, files, known);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  s.agree_or_throw(error, "checkpoint step " + std::to_string(save.step) + " not committed");
  dir = g.world->broadcast_string(dir, 0);
  const std::vector<std::string> pruned =
      s.rank0() ? s.checkpoints->prune(c.checkpoint.keep_last, c.checkpoint.milestone_every)
                : std::vector<std::string>{};

  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - save.started).count();
  s.last_checkpoint = dir;
  s.event(save.step, "checkpoint", dir + " (" + save.reason + (background ? ", in the background" : "") + ")");
  for (const auto& p : pruned) s.event(save.step, "checkpoint_pruned", p);
  if (s.rank0()) {
    const std::string how =
        background ? fmt::format(" in the background: training stalled {:.2f} s for the snapshot, {:.2f} s to commit",
                                 save.stall_s, std::chrono::duration<double>(now - commit_start).count())
                   : "";
    spdlog::info("checkpoint {} saved in {:.2f} s ({}){}{}", dir, seconds, save.reason, how,
                 pruned.empty() ? "" : fmt::format("; pruned {}", pruned.size()));
  }
  return dir;
}

// The optimizer state `tensors` (parts of placeholders, or whole tensors) made real. With the same plugin, each
// is read straight into the plugin's own tensor of that name (save_state hands out its live moments), so that a
// resume never holds this rank's optimizer state twice; anything else is read into a new tensor.
void read_optimizer_state(plugin_host::LoadedPlugin& optimizer, bool same_plugin, checkpoint::NamedTensors& tensors) {
  std::map<std::string, at::Tensor> live;
  if (same_plugin) {
    for (const auto& [name, t] : optimizer.object->save_state().tensors) live.emplace(name, t);
  }
  for (auto& [name, t] : tensors) {
    if (!t.is_meta()) continue;
    const auto it = live.find(name);
    if (it != live.end() && it->second.sizes() == t.sizes() && it->second.scalar_type() == t.scalar_type()) {
      checkpoint::materialize_into(t, it->second);
      t = it->second;
    } else {
      t = checkpoint::materialize(t);
    }
  }
}

}  // namespace

std::string save_checkpoint(TrainerState& s, const std::string& reason, SaveMode mode) {
  finish_background_save(s, /*wait=*/true);  // at most one save in flight; saves commit in step order
  const Config& c = s.config;
  const parallel::ProcessGroups& g = s.groups;
  const int64_t step = s.loader->step();  // steps completed
  const std::string final_dir = s.paths.checkpoints() + "/" + checkpoint::step_dir_name(step);
  // Rank 0 owns the directory protocol (begin, commit, prune); every rank writes its own file in between.
  const bool exists = g.world->broadcast_string(s.rank0() && s.checkpoints->exists(step) ? "1" : "0", 0) == "1";
  if (exists) return final_dir;
  PendingSave save;
  save.step = step;
  save.reason = reason;
  save.config = c;
  save.started = std::chrono::steady_clock::now();
  std::string error;
  if (s.rank0()) {
    try {
      save.tmp = s.checkpoints->begin(step);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  s.agree_or_throw(error, "checkpoint step " + std::to_string(step) + " not started");
  save.tmp = g.world->broadcast_string(save.tmp, 0);

  // This rank's file: its shards (model tensors from DP rank 0; TP-replicated ones from TP rank 0 only, so that
  // every element is written once), its optimizer state (all of it, or its ZeRO-1 share), its RNG, and the
  // run's metadata, identical on every rank.
  const bool background = mode == SaveMode::kBackground && c.checkpoint.async;
  const std::string rank_file = save.tmp + "/" + checkpoint::rank_file_name(g.rank);
  const std::string fault =
      s.fault.at("save_fail", g.rank, step) ? rank_file + ": injected failure (KEEL_TEST_FAULT)" : "";
  try {
    checkpoint::TrainingState st = capture_rank_state(s, step);
    checkpoint::capture_rng(st);
    st.data_ledger = s.loader->state().dump();
    st.config_ini = to_ini(c);
    st.lineage = checkpoint::lineage_to_json(s.lineage);
    save.config_ini = st.config_ini;
    save.lineage = st.lineage;
    save.data_fingerprint = s.loader->fingerprint().dump();
    if (background) {
      // Host copies now; the write, fsync and SHA-256 on the background thread while training goes on.
      if (!s.async_save) s.async_save = std::make_shared<AsyncSaver>();
      s.async_save->snapshot().take(st, s.device);
      save.stall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - save.started).count();
      s.async_save->start(save, std::move(st), rank_file, {g.rank, g.world_size()}, fault);
    } else {
      if (!fault.empty()) throw checkpoint::CheckpointError(fault);
      checkpoint::write_rank_file(rank_file, st, {g.rank, g.world_size()});
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (background) {
    // A snapshot that failed on any rank: the threads already started end before rank 0 removes the .tmp.
    if (!g.world->single() || !error.empty()) {
      const std::vector<std::string> errors = g.world->all_gather_strings(error);
      if (std::any_of(errors.begin(), errors.end(), [](const std::string& e) { return !e.empty(); })) {
        if (s.async_save) s.async_save->clear();
        commit_none_unless_all_wrote(s, step, save.tmp, error);
      }
    }
    return final_dir;
  }
  // A file missing on any rank: no rank commits; the previous checkpoint stays the latest.
  commit_none_unless_all_wrote(s, step, save.tmp, error);
  return commit_and_prune(s, save, {}, /*background=*/false);
}

void finish_background_save(TrainerState& s, bool wait) {
  if (!s.async_save || !s.async_save->in_flight()) return;
  AsyncSaver& saver = *s.async_save;
  const parallel::ProcessGroups& g = s.groups;
  using Status = AsyncSaver::Status;
  Status status = saver.poll(wait);
  if (!g.world->single()) {  // the most severe on any rank: failed > still writing > done
    at::Tensor code = torch::full({1}, static_cast<float>(status));
    g.world->all_reduce(code, parallel::ReduceOp::kMax);
    status = static_cast<Status>(static_cast<int>(code.item<float>()));
  }
  if (status == Status::kWriting) return;  // not yet durable everywhere: asked again at the next boundary
  const PendingSave save = saver.save();
  if (status == Status::kFailed) {
    saver.poll(/*wait=*/true);  // this rank's thread has ended before rank 0 removes the .tmp
    const std::string error = saver.error();
    saver.clear();
    commit_none_unless_all_wrote(s, save.step, save.tmp, error);
  }
  // Every rank's file is written, fsynced and hashed: rank 0 commits with the digests the writers computed.
  const checkpoint::FileDigest& own = saver.digest();
  const std::vector<std::string> digests = g.world->all_gather_strings(std::to_string(own.bytes) + " " + own.sha256);
  saver.clear();
  std::map<std::string, checkpoint::FileDigest> known;
  for (size_t r = 0; r < digests.size(); ++r) {
    const auto space = digests[r].find(' ');
    checkpoint::FileDigest d;
    d.bytes = std::stoll(digests[r].substr(0, space));
    d.sha256 = digests[r].substr(space + 1);
    known[checkpoint::rank_file_name(static_cast<int64_t>(r))] = d;
  }
  commit_and_prune(s, save, known, /*background=*/true);
}

std::vector<std::string> apply_checkpoint(TrainerState& s, const checkpoint::TrainingState& st,
                                          const std::string& origin, bool allow_data_change, bool restore_plugins) {
  using checkpoint::CheckpointError;
  std::vector<std::string> notes;
  // 1. Check what can be checked before anything changes: model tensors by name, shape and dtype; the ledger.
  auto find = [](const checkpoint::NamedTensors& list, const std::string& name) -> const torch::Tensor* {
    for (const auto& [n, t] : list) {
      if (n == name) return &t;
    }
    return nullptr;
  };
  // `st` holds whole tensors (read_full_state) or placeholders (read_lazy_state); this rank takes its TP shard of
  // each of its stage's parameters (checkpoint::materialize reads only that part of a placeholder), and its
  // optimizer's part of the optimizer state.
  const parallel::ProcessGroups& g = s.groups;
  {
    // Name the tensors that do not match, not just their counts.
    std::set<std::string> in_checkpoint, in_model(s.tensor_names.begin(), s.tensor_names.end());
    for (const auto& [name, tensor] : st.model) in_checkpoint.insert(name);
    std::string missing, extra;
    for (const auto& name : s.tensor_names)
      if (!in_checkpoint.count(name)) missing += (missing.empty() ? "" : ", ") + name;
    for (const auto& name : in_checkpoint)
      if (!in_model.count(name)) extra += (extra.empty() ? "" : ", ") + name;
    if (!missing.empty() || !extra.empty()) {
      throw CheckpointError(
          origin + ": " + (missing.empty() ? "" : "no model tensor " + missing + " in its rank files") +
          (missing.empty() || extra.empty() ? "" : "; ") +
          (extra.empty() ? "" : "model tensor " + extra + " is not in this model") + " (checkpoint " +
          std::to_string(st.model.size()) + " tensors, model " + std::to_string(s.tensor_names.size()) + ")");
    }
  }
  std::vector<torch::Tensor> shards;  // per entry of s.params
  for (size_t i = 0; i < s.params.size(); ++i) {
    const auto& p = s.params[i];
    const torch::Tensor* t = find(st.model, p.name);
    if (!t) throw CheckpointError(origin + ": no model tensor '" + p.name + "'");
    const std::vector<int64_t> whole = model::global_shape(p.param.sizes(), s.specs[i], g.layout.tp());
    if (t->sizes().vec() != whole) {
      throw CheckpointError(origin + ": model tensor '" + p.name + "' has shape " + c10::str(t->sizes()) +
                            ", the model needs " + c10::str(at::IntArrayRef(whole)));
    }
    if (t->scalar_type() != torch::kFloat) {
      throw CheckpointError(origin + ": model tensor '" + p.name + "' is " + c10::toString(t->scalar_type()) +
                            ", expected float32 (fp32 master weights)");
    }
    shards.push_back(model::shard_of(*t, s.specs[i], g.coords.tp, g.layout.tp()));  // a view; read in step 3
  }
  // The optimizer state of the parameters this rank's optimizer updates, cut like their parameters.
  checkpoint::NamedTensors optimizer_tensors;
  for (const auto& [name, tensor] : st.optimizer) {
    const auto slash = name.rfind('/');
    if (slash == std::string::npos) continue;
    const std::string param = name.substr(0, slash);
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (s.params[i].name != param) continue;
      bool bound = false;
      for (const auto& op : s.optimizer_params) bound = bound || op.name == param;
      if (!bound) break;
      const bool placed =
          tensor.sizes().vec() == model::global_shape(s.params[i].param.sizes(), s.specs[i], g.layout.tp());
      optimizer_tensors.emplace_back(name,
                                     placed ? model::shard_of(tensor, s.specs[i], g.coords.tp, g.layout.tp()) : tensor);
      break;
    }
  }
  const nlohmann::json ledger = checkpoint::parse_json_object(st.data_ledger, origin + ": data ledger");
  if (checkpoint::JsonFields(ledger, origin + ": data ledger").integer_or("step", -1) != st.step)
    throw CheckpointError(origin + ": the data ledger is not at step " + std::to_string(st.step));
  const nlohmann::json schedule = checkpoint::parse_json_object(st.lr_schedule, origin + ": lr_schedule");
  const checkpoint::JsonFields schedule_fields(schedule, origin + ": lr_schedule");
  const double lr_factor = schedule_fields.number_or("lr_factor", 1.0);
  const int64_t lr_factor_until = schedule_fields.integer_or("lr_factor_until", -1);

  // 2. The optimizer: its own state if it is the same plugin, otherwise it adopts what it can by name.
  torch::NoGradGuard no_grad;
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  read_optimizer_state(optimizer, st.optimizer_name == optimizer.name(), optimizer_tensors);
  try {
    if (st.optimizer_name == optimizer.name()) {
      optimizer.object->load_state({st.optimizer_json, optimizer_tensors});
    } else {
      for (const auto& line : optimizer.object->adopt_state(optimizer_tensors))
        notes.push_back("optimizer " + st.optimizer_name + " -> " + optimizer.name() + ": " + line);
    }
  } catch (const std::exception& e) {
    throw CheckpointError("optimizer " + optimizer.name() + " cannot load the checkpoint's " + st.optimizer_name +
                          " state: " + e.what());
  }

  // 3. Weights, data position, RNG, counters.
  // One tensor read at a time from a placeholder (checked above; the files were verified when resolved).
  for (size_t i = 0; i < s.params.size(); ++i) checkpoint::materialize_into(shards[i], s.params[i].param);
  const nlohmann::json fingerprint_now = s.loader->fingerprint();
  s.loader->load_state(ledger, allow_data_change);
  if (allow_data_change && ledger.value("fingerprint", nlohmann::json()) != fingerprint_now) {
    notes.push_back("data changed (allowed by --allow-data-change): checkpoint data " +
                    ledger.value("fingerprint", nlohmann::json()).dump() + ", now " + fingerprint_now.dump());
  }
  s.tokens_seen = st.tokens_seen;
  s.lr_factor = lr_factor;
  s.lr_factor_until = lr_factor_until;
  checkpoint::restore_rng(st);  // empty when the layout changed: the generators keep their per-rank seeding

  // 4. The other plugins' own state, matched by slot and name.
  if (restore_plugins) restore_plugin_states(s, st, notes);
  return notes;
}

int64_t roll_back(TrainerState& s, int64_t step, const StepRecord& r) {
  finish_background_save(s, /*wait=*/true);  // a save in flight may be the checkpoint to go back to
  const sdk::Decision& d = r.decision;
  // The newest valid checkpoint at or before this step (the update of `step` was not applied).
  std::optional<checkpoint::CheckpointEntry> target;  // chosen by rank 0, the same on every rank
  std::string target_dir;
  if (s.rank0()) {
    for (const auto& e : s.checkpoints->list_valid()) {
      if (e.step <= step) target_dir = e.dir;
    }
  }
  target_dir = s.groups.world->broadcast_string(target_dir, 0);
  if (!target_dir.empty()) target = checkpoint::CheckpointEntry{0, target_dir};
  if (!target) {
    s.event(step, "rollback_unavailable", "no checkpoint to roll back to; the update was skipped instead");
    spdlog::warn("step {}: {} asked for a rollback but this run has no checkpoint yet: update skipped", step,
                 r.decided_by);
    return step + 1;
  }
  if (++s.rollbacks > kMaxRollbacks)
    throw std::runtime_error("more than " + std::to_string(kMaxRollbacks) + " rollbacks in one run: stopping");
  const checkpoint::Manifest manifest = checkpoint::verify_checkpoint_dir(target->dir);
  const checkpoint::TrainingState st = checkpoint::read_lazy_state(target->dir, manifest, s.groups.rank);
  // The skip rules in force now: the checkpoint's ledger lacks those added since (by earlier rollbacks).
  const nlohmann::json skip_before = s.loader->state().at("skip");
  apply_checkpoint(s, st, target->dir, /*allow_data_change=*/false,
                   /*restore_plugins=*/false);  // plugins keep their memory
  // The intervention first: the reason can be long, and events keep 511 bytes.
  std::string what = "step " + std::to_string(step) + " -> checkpoint step " + std::to_string(st.step);
  const std::vector<std::string> kept = s.loader->carry_skip(skip_before, /*from_now=*/true);
  if (!d.skip_data.empty()) {
    s.loader->add_skip(st.step, d.skip_data, "rollback at step " + std::to_string(step) + " by " + r.decided_by);
    what += "; skip " + d.skip_data;
  }
  if (!kept.empty()) what += "; kept " + std::to_string(kept.size()) + " earlier skip rule(s)";
  if (!d.skip_data.empty() || !kept.empty()) record_skip_rules(s);
  if (d.reset_optimizer_moments) {
    s.plugins->optimizer().object->reset_moments();
    what += "; optimizer moments reset";
  }
  if (!d.moment_scales.empty()) what += "; " + apply_decision_moment_scales(s, d.moment_scales, r.decided_by);
  if (d.lr_factor != 1.0 && d.lr_factor_steps > 0) {
    s.lr_factor = d.lr_factor;
    s.lr_factor_until = st.step + d.lr_factor_steps;
    what += "; LR x" + std::to_string(d.lr_factor) + " until step " + std::to_string(s.lr_factor_until);
  }
  if (plugin_host::LoadedPlugin* handler = s.plugins->spike_handler()) {
    sdk::StepContext ctx;
    ctx.step = st.step;
    s.call(*handler, ctx, [&](sdk::Plugin& p) { p.on_rollback(st.step); });
  }
  what += " (" + r.decided_by + ": " + d.reason + ")";
  s.event(step, "rollback", what);
  s.lineage.notes.push_back("rollback: " + what);
  s.write_lineage();
  spdlog::warn("rollback: {}", what);
  return st.step;
}

}  // namespace keel::train

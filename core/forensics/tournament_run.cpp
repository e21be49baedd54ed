// Why: see tournament_run.h. The branches are child processes (not threads of this one) so that each is exactly
// the `keel resume` a user would type, with its own run-dir lock, log and exit status, and so that J of them run
// side by side without sharing LibTorch's thread pool.
#include "core/forensics/tournament_run.h"

#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/eval/eval.h"
#include "core/forensics/child_process.h"
#include "core/forensics/replay_check.h"

namespace keel::forensics {
namespace {

namespace fs = std::filesystem;

std::string branch_name(const Arm& arm, int64_t seed) { return arm.name + "-seed" + std::to_string(seed); }

// The same held-out windows for every branch: source name and its [N, T+1] int64 windows.
std::vector<std::pair<std::string, torch::Tensor>> heldout_sets(const Config& config, int64_t windows,
                                                                std::vector<std::string>& without) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& source : config.data.sources) {
    std::vector<std::vector<int32_t>> rows;
    try {
      rows = eval::heldout_windows(config.data.dir, source.name, config.model.seq_len, windows);
    } catch (const data::DataError&) {
      without.push_back(source.name);
      continue;
    }
    if (rows.empty()) {
      without.push_back(source.name);
      continue;
    }
    torch::Tensor t = torch::empty({static_cast<int64_t>(rows.size()), config.model.seq_len + 1}, torch::kInt64);
    for (size_t i = 0; i < rows.size(); ++i)
      t[static_cast<int64_t>(i)].copy_(torch::tensor(std::vector<int64_t>(rows[i].begin(), rows[i].end())));
    out.emplace_back(source.name, t);
  }
  return out;
}

checkpoint::ResolvedCheckpoint end_checkpoint(const TournamentSetup& setup, const Branch& b) {
  checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(b.run_dir);
  if (ckpt.manifest.step != setup.from_step + setup.steps)
    throw TournamentError("branch " + b.run_dir + ": its newest checkpoint is step " +
                          std::to_string(ckpt.manifest.step) + ", expected the end step " +
                          std::to_string(setup.from_step + setup.steps) + " (log: " + b.log + ")");
  return ckpt;
}

}  // namespace

std::vector<Branch> plan_branches(const TournamentSetup& setup) {
  std::vector<Branch> out;
  for (size_t a = 0; a < setup.arms.size(); ++a) {
    for (int64_t s = 0; s < setup.seeds; ++s) {
      const std::string name = branch_name(setup.arms[a], s);
      out.push_back({a, s, setup.out + "/" + name, setup.out + "/logs/" + name + ".log"});
    }
  }
  return out;
}

std::vector<std::string> branch_command(const TournamentSetup& setup, const Branch& b) {
  std::vector<std::string> argv{setup.keel};
  if (setup.world > 1) argv.insert(argv.end(), {"launch", "--nproc", std::to_string(setup.world), "--", setup.keel});
  argv.insert(argv.end(), {"resume", "--from", setup.checkpoint, "--run-dir", b.run_dir});
  std::vector<std::string> sets{"train.steps=" + std::to_string(setup.from_step + setup.steps),
                                "optim.decay_steps=" + std::to_string(setup.decay_steps), "checkpoint.at_end=true"};
  const std::string& extra = setup.replicate_skip.at(static_cast<size_t>(b.seed));
  if (!extra.empty())
    sets.push_back("data.skip=" + (setup.parent_skip.empty() ? extra : setup.parent_skip + ";" + extra));
  const Arm& arm = setup.arms[b.arm];
  for (const auto& o : arm.overrides()) sets.push_back(o);
  for (const auto& s : sets) argv.insert(argv.end(), {"--set", s});
  for (const auto& p : arm.plugins()) argv.insert(argv.end(), {"--plugin", p});
  for (const auto& p : arm.plugin_args()) argv.insert(argv.end(), {"--plugin-arg", p});
  return argv;
}

void run_branches(const TournamentSetup& setup, const std::vector<Branch>& branches) {
  fs::create_directories(setup.out + "/logs");
  std::map<pid_t, size_t> running;
  std::vector<std::string> failed;
  size_t next = 0;
  while (next < branches.size() || !running.empty()) {
    while (failed.empty() && next < branches.size() && static_cast<int64_t>(running.size()) < setup.jobs) {
      running[start_child(branch_command(setup, branches[next]), branches[next].log, "a branch")] = next;
      ++next;
    }
    if (!failed.empty() && running.empty()) break;
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) continue;
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    const Branch& b = branches[it->second];
    running.erase(it);
    const int rc = exit_status_of(status);
    if (rc != 0)
      failed.push_back("arm " + setup.arms[b.arm].name + " (replicate " + std::to_string(b.seed) + ") exited " +
                       std::to_string(rc) + "; " + b.log + " ends:" + last_lines(b.log, 4, "    "));
  }
  if (!failed.empty()) {
    std::string message = std::to_string(failed.size()) + " branch(es) failed (no further branch was started):";
    for (const auto& f : failed) message += "\n  " + f;
    throw TournamentError(message);
  }
}

Measurement measure_branches(const TournamentSetup& setup, const std::vector<Branch>& branches, int64_t windows,
                             bool train_loss) {
  Measurement m;
  const checkpoint::ResolvedCheckpoint first = end_checkpoint(setup, branches.at(0));
  const Config config = load_config(first.dir + "/config.ini");
  std::vector<std::string> without;
  const auto sets =
      train_loss ? std::vector<std::pair<std::string, torch::Tensor>>{} : heldout_sets(config, windows, without);
  if (!sets.empty()) {
    m.kind = "heldout";
    m.description =
        "per-window NLL (fp32) of the held-out split at step " + std::to_string(setup.from_step + setup.steps) + ":";
    for (const auto& [name, t] : sets) m.description += " " + name + " " + std::to_string(t.size(0));
    m.description += " windows of " + std::to_string(config.model.seq_len) + " tokens";
    if (!without.empty()) {
      m.description += "; without a held-out set, not measured:";
      for (const auto& w : without) m.description += " " + w;
    }
    if (config.train.threads > 0) torch::set_num_threads(static_cast<int>(config.train.threads));
    for (const auto& b : branches) {
      const checkpoint::ResolvedCheckpoint ckpt = end_checkpoint(setup, b);
      const Config c = load_config(ckpt.dir + "/config.ini");
      const checkpoint::TrainingState state = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1);
      const model::Llama model = eval::load_model(c, state, ckpt.dir);
      std::vector<double> units;
      for (const auto& [name, t] : sets) {
        const std::vector<double> nll = eval::window_nll(model, t, c.train.micro_batch);
        units.insert(units.end(), nll.begin(), nll.end());
      }
      m.units.push_back(std::move(units));
    }
    return m;
  }
  // No held-out set: the training loss of every sample in the last steps (paired by step and batch slot).
  const int64_t last = std::min<int64_t>(setup.steps, 10);
  const int64_t from = setup.from_step + setup.steps - last;
  m.kind = "train_loss";
  m.description = "per-sample training loss of steps " + std::to_string(from) + ".." + std::to_string(from + last - 1) +
                  (train_loss ? " (--measure train-loss)" : " (no source has a held-out set)");
  for (const auto& b : branches) {
    const LoggedRun run = read_logged_run(b.run_dir + "/metrics.h5");
    std::vector<double> units;
    for (int64_t s = from; s < from + last; ++s) {
      const auto it = run.steps.find(s);
      if (it == run.steps.end() || it->second.sample_losses.empty())
        throw TournamentError("branch " + b.run_dir + ": metrics.h5 has no sample losses of step " + std::to_string(s));
      units.insert(units.end(), it->second.sample_losses.begin(), it->second.sample_losses.end());
    }
    m.units.push_back(std::move(units));
  }
  return m;
}

}  // namespace keel::forensics

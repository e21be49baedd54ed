// Why: `keel verify RUN [--from CKPT] [--steps K] [--json]` answers "does this run still replay bit for bit?" — the
// check that finds nondeterminism, a changed build, or corrupted data or checkpoints. It replays K logged steps
// from a checkpoint as a child `keel resume` into a scratch dir (through `keel launch` when the run had several
// ranks, in the same layout), then compares loss, grad norm, every per-tensor norm and every sample's loss with the
// run's metrics.h5 (forensics/replay_check.h) and names the first step and value that differ. Exit 0: identical;
// 1: a difference; 2: the check could not be made (the error is printed). docs/forensics.md.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/forensics/child_process.h"
#include "core/forensics/replay_check.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

struct VerifyOptions {
  std::string run, from, scratch;
  int64_t steps = 0;  // 0: every logged step after the checkpoint
  std::vector<std::string> overrides;
  bool json = false, keep = false;
};

// The checkpoint to replay from and how many steps: --from, or the newest valid checkpoint of RUN whose step the
// run logged; K = --steps, or every consecutive logged step from there.
struct ReplayWindow {
  std::string checkpoint;
  int64_t first = 0, steps = 0;
};

int64_t logged_after(const forensics::LoggedRun& run, int64_t first) {
  int64_t n = 0;
  while (run.steps.count(first + n)) ++n;
  return n;
}

ReplayWindow choose_window(const VerifyOptions& o, const forensics::LoggedRun& logged) {
  ReplayWindow w;
  if (!o.from.empty()) {
    const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(o.from);
    for (const auto& warning : ckpt.warnings) std::cerr << "keel verify: warning: " << warning << "\n";
    w.checkpoint = ckpt.dir;
    w.first = ckpt.manifest.step;
  } else {
    const auto valid = checkpoint::CheckpointStore(o.run + "/checkpoints").list_valid();
    for (auto it = valid.rbegin(); it != valid.rend() && w.checkpoint.empty(); ++it) {
      if (logged.steps.count(it->step)) w = {it->dir, it->step, 0};
    }
    if (w.checkpoint.empty())
      throw std::runtime_error(o.run + " has no valid checkpoint with logged steps after it (give --from CKPT)");
  }
  const int64_t available = logged_after(logged, w.first);
  if (available == 0)
    throw std::runtime_error(logged.path + " logged no step " + std::to_string(w.first) + " to compare a replay from " +
                             w.checkpoint + " with");
  if (o.steps > available)
    throw std::runtime_error("--steps " + std::to_string(o.steps) + ": " + logged.path + " logged only " +
                             std::to_string(available) + " consecutive steps from step " + std::to_string(w.first));
  w.steps = o.steps > 0 ? o.steps : available;
  return w;
}

// The replay: `keel resume` of the checkpoint into SCRATCH/run for exactly the window's steps, with the LR
// schedule's length pinned (train.steps changes) and no checkpoints written; the run's own layout.
std::vector<std::string> replay_command(const VerifyOptions& o, const ReplayWindow& w, const std::string& run_dir) {
  const Config config = load_config(w.checkpoint + "/config.ini");
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> argv{self};
  const int64_t world = config.parallel.dp * config.parallel.tp * config.parallel.pp;
  if (world > 1) argv.insert(argv.end(), {"launch", "--nproc", std::to_string(world), "--", self});
  argv.insert(argv.end(), {"resume", "--from", w.checkpoint, "--run-dir", run_dir});
  std::vector<std::string> sets{"train.steps=" + std::to_string(w.first + w.steps),
                                "optim.decay_steps=" + std::to_string(config.lr_decay_steps()), "checkpoint.every=0",
                                "checkpoint.at_end=false"};
  sets.insert(sets.end(), o.overrides.begin(), o.overrides.end());
  for (const auto& s : sets) argv.insert(argv.end(), {"--set", s});
  return argv;
}

std::string make_scratch(const VerifyOptions& o) {
  if (!o.scratch.empty()) {
    if (fs::exists(o.scratch) && !fs::is_empty(o.scratch))
      throw std::runtime_error("--scratch " + o.scratch + " exists and is not empty");
    fs::create_directories(o.scratch);
    return o.scratch;
  }
  std::string pattern = (fs::temp_directory_path() / "keel-verify-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("cannot create a scratch dir " + pattern);
  return pattern;
}

// Replays the window and compares it: the first mismatch (nullopt when every step is bit-identical).
std::optional<forensics::Mismatch> replay_and_compare(const VerifyOptions& o, const ReplayWindow& w,
                                                      const forensics::LoggedRun& logged, const std::string& scratch) {
  const std::string run_dir = scratch + "/run", log = scratch + "/replay.log";
  const int rc = forensics::run_child(replay_command(o, w, run_dir), log, "the replay");
  if (rc != 0)
    throw std::runtime_error("the replay (keel resume from " + w.checkpoint + ") failed with exit " +
                             std::to_string(rc) + "; its log " + log + " ends:" + forensics::last_lines(log, 5));
  const forensics::LoggedRun replayed = forensics::read_logged_run(run_dir + "/metrics.h5");
  for (int64_t step = w.first; step < w.first + w.steps; ++step) {
    const auto it = replayed.steps.find(step);
    if (it == replayed.steps.end()) return forensics::Mismatch{step, "step missing in the replay", "logged", "absent"};
    if (auto m = forensics::compare_step(logged.steps.at(step), it->second, logged.tensor_names)) return m;
  }
  return std::nullopt;
}

}  // namespace

int cmd_verify(const Args& args) {
  VerifyOptions o;
  std::vector<std::string> positional;
  po::options_description options("keel verify RUN_DIR");
  options.add_options()("from", po::value<std::string>(&o.from),
                        "checkpoint dir to replay from (default: the newest valid one of RUN_DIR with logged steps "
                        "after it)")("steps", po::value<int64_t>(&o.steps),
                                     "steps to replay and compare (default: every logged step after it)")(
      "set", po::value<std::vector<std::string>>(&o.overrides)->composing(),
      "override a key of the replay (e.g. train.precision, to see what a change does; repeatable)")(
      "scratch", po::value<std::string>(&o.scratch), "directory for the replay (default: a new temp dir)")(
      "keep", "keep the replay's directory (kept anyway when it differs)")("json", "print one JSON object")(
      "help", "show this help");
  auto vm = parse_args(args, options, "verify", &positional);
  if (vm.count("help")) {
    std::cout << "usage: keel verify RUN_DIR [--from CKPT] [--steps K] [--json]\n"
                 "Replays K logged steps from a checkpoint and compares loss, grad norm, per-tensor norms and "
                 "per-sample losses bit for bit with RUN_DIR/metrics.h5.\nExit 0: identical; 1: a difference (the "
                 "first step and value are named); 2: the check could not be made.\n\n"
              << options;
    return 0;
  }
  o.json = vm.count("json") > 0;
  o.keep = vm.count("keep") > 0;
  std::string scratch;
  try {
    if (positional.size() != 1)
      throw std::runtime_error("expected one RUN_DIR, got " + std::to_string(positional.size()) +
                               " (see keel verify --help)");
    o.run = positional[0];
    if (vm.count("steps") && o.steps < 1) throw std::runtime_error("--steps must be >= 1");
    const forensics::LoggedRun logged = forensics::read_logged_run(o.run + "/metrics.h5");
    const ReplayWindow w = choose_window(o, logged);
    scratch = make_scratch(o);
    const std::optional<forensics::Mismatch> mismatch = replay_and_compare(o, w, logged, scratch);
    const bool kept = o.keep || mismatch;
    if (!kept) fs::remove_all(scratch);
    if (o.json) {
      nlohmann::json j{{"run", o.run},
                       {"checkpoint", w.checkpoint},
                       {"first_step", w.first},
                       {"steps_checked", w.steps},
                       {"identical", !mismatch},
                       {"first_mismatch", nullptr},
                       {"replay_dir", kept ? nlohmann::json(scratch + "/run") : nlohmann::json(nullptr)}};
      if (mismatch)
        j["first_mismatch"] = {{"step", mismatch->step},
                               {"what", mismatch->what},
                               {"logged", mismatch->logged},
                               {"replayed", mismatch->replayed}};
      print_json(j);
    } else if (mismatch) {
      std::cout << "keel verify: " << forensics::describe(*mismatch) << "\n  replayed steps " << w.first << ".."
                << w.first + w.steps - 1 << " from " << w.checkpoint << "; the replay is in " << scratch << "/run\n";
    } else {
      std::cout << "keel verify: steps " << w.first << ".." << w.first + w.steps - 1 << " (" << w.steps
                << ") replayed from " << w.checkpoint << " are bit-identical to " << logged.path << "\n";
    }
    return mismatch ? 1 : 0;
  } catch (const std::exception& e) {
    std::cerr << "keel verify: error: " << e.what() << (scratch.empty() ? "" : " (replay dir " + scratch + ")") << "\n";
    return 2;
  }
}

}  // namespace keel::cli

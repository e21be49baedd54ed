// Why: `keel control RUN_DIR swap SLOT=NAME_OR_PATH [--plugin-arg NAME.key=value]... [--at-step N] [--wait-s S]
// [--json]` asks a running job to swap a plugin at a step boundary (docs/plugins.md). A request that could never
// be applied is refused here, with a non-zero exit, instead of sitting in RUN_DIR/control/ forever: the run must
// be alive (a live process holds RUN_DIR/.lock), the slot known, the plugin must load and pass the handshake
// with its arguments (built exactly as the trainer will build it, from the run's config), and --at-step must not
// be in the past. With --wait-s the command waits for the trainer's answer and exits non-zero on a refusal.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/metrics_reader.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/control.h"
#include "core/train/run_dir.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

// The first step the run has not yet logged, from its metrics file (-1 when it cannot be read right now: the
// trainer may be flushing). Rows are flushed every metrics.flush_every steps, so the run may be a little further.
int64_t next_logged_step(const std::string& run_dir) {
  try {
    const std::vector<int64_t> steps = metrics::MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step");
    return steps.empty() ? 0 : steps.back() + 1;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

int cmd_control(const Args& args) {
  std::vector<std::string> positional, plugin_args;
  int64_t at_step = -1;
  double wait_s = 0.0;
  po::options_description options("keel control RUN_DIR swap SLOT=NAME_OR_PATH");
  // clang-format off
  options.add_options()
      ("plugin-arg", po::value<std::vector<std::string>>(&plugin_args)->composing(),
       "an argument of the new plugin: NAME.key=value (repeatable)")
      ("at-step", po::value<int64_t>(&at_step), "apply at the boundary before step N (default: the next boundary)")
      ("wait-s", po::value<double>(&wait_s), "wait up to S seconds for the run's answer; a refusal exits 1")
      ("json", "print the request (and the answer) as one JSON object")
      ("help", "show this help");
  // clang-format on
  const po::variables_map vm = parse_args(args, options, "control", &positional);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (positional.size() != 3 || positional[1] != "swap")
    throw std::runtime_error("expected RUN_DIR swap SLOT=NAME_OR_PATH (see keel control --help)");
  if (vm.count("at-step") && at_step < 0)
    throw std::runtime_error("--at-step must be >= 0, got " + std::to_string(at_step));
  const std::string run_dir = positional[0];
  const train::RunPaths paths{run_dir};
  if (!fs::exists(paths.metrics_h5()) || !fs::exists(paths.config_ini()))
    throw std::runtime_error(run_dir + " is not a keel run dir (no metrics.h5 and config.ini)");

  // 1. Alive: otherwise nobody will ever read the request.
  const long owner = train::run_dir_owner(run_dir);
  if (owner == 0) {
    throw std::runtime_error("run dir " + run_dir + " has no live run (no process holds " + paths.lock_file() +
                             "); resume it with keel resume --plugin " + positional[2] + " instead");
  }

  // 2. The request, and the plugin built from it exactly as the trainer will build it.
  train::SwapRequest request = train::parse_swap_request("swap " + positional[2] + "\n");
  request.args = plugin_args;
  request.at_step = at_step;
  plugin_host::parse_slot(request.slot);
  Config next = load_config(paths.config_ini());
  for (const auto& override_text : request.overrides()) apply_override(next, override_text, "keel control");
  plugin_host::PluginHost::load_slot(request.slot, next);  // throws naming the plugin: load, handshake, arguments

  // 3. Not in the past (as far as the metrics file shows; the trainer checks again at its boundary).
  const int64_t next_step = next_logged_step(run_dir);
  if (at_step >= 0 && next_step > at_step) {
    throw std::runtime_error("--at-step " + std::to_string(at_step) +
                             " is in the past: the run has already logged step " + std::to_string(next_step - 1));
  }

  const std::string path = train::write_swap_request(paths.control_dir(), request);
  std::optional<std::string> outcome;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
  while (wait_s > 0 && !(outcome = train::request_outcome(path)) && std::chrono::steady_clock::now() < deadline) {
    if (train::run_dir_owner(run_dir) == 0) {
      outcome = train::request_outcome(path);
      if (!outcome) outcome = "refused: the run ended before it reached the request";
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const bool refused = outcome && outcome->rfind("refused", 0) == 0;
  if (vm.count("json")) {
    nlohmann::json j{{"request", path},      {"run_pid", owner},
                     {"slot", request.slot}, {"plugin", request.plugin},
                     {"at_step", at_step},   {"status", outcome ? (refused ? "refused" : "done") : "pending"}};
    if (refused) j["reason"] = outcome->substr(std::string("refused: ").size());
    std::cout << j.dump() << "\n";
  } else if (!outcome) {
    std::cout << "swap request written: " << path << " (run pid " << owner << ")\n"
              << "the run applies it at "
              << (at_step >= 0 ? "the boundary before step " + std::to_string(at_step) : "its next step boundary")
              << " (after saving a checkpoint); the file then becomes .done, or .refused with the reason\n";
  } else {
    std::cout << "swap request " << path << ": " << *outcome << "\n";
  }
  if (refused)
    throw std::runtime_error("the run refused the swap: " + outcome->substr(std::string("refused: ").size()));
  if (wait_s > 0 && !outcome)
    throw std::runtime_error("no answer from the run within " + std::to_string(wait_s) +
                             " s; the request stays pending: " + path);
  return 0;
}

}  // namespace keel::cli

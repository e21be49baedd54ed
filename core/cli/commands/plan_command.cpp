// Why: `keel plan --config FILE [--set k=v]... [--nproc N] [--path fused|reference] [--json]` answers "does this
// layout fit, and what does each rank hold and send?" before a GPU is touched: it loads and validates the config
// (a layout that does not divide the model is refused naming the key) and prints core/plan's per-stage plan,
// allocating no tensor. --nproc N sets parallel.dp to N / (tp x pp), as `keel launch --nproc N` would need.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/metrics/logger.h"
#include "core/plan/plan.h"

namespace keel::cli {
namespace {

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return text;
}

std::string billions(double n) {
  char text[32];
  std::snprintf(text, sizeof(text), n >= 1e9 ? "%.2fB" : "%.2fM", n >= 1e9 ? n / 1e9 : n / 1e6);
  return text;
}

nlohmann::json stage_json(const plan::StagePlan& s) {
  return {{"pp_rank", s.pp_rank},
          {"layers", {s.first_layer, s.first_layer + s.layers}},
          {"embedding", s.embedding},
          {"head", s.head},
          {"ranks", s.ranks},
          {"parameters", s.parameters},
          {"params_bytes", s.params_bytes},
          {"grads_bytes", s.grads_bytes},
          {"optimizer_bytes", s.optimizer_bytes},
          {"weight_copy_bytes", s.weight_copy_bytes},
          {"activation_bytes", s.activation_bytes},
          {"inflight_microbatches", s.inflight_microbatches},
          {"workspace_bytes", s.workspace_bytes},
          {"total_bytes", s.total_bytes},
          {"largest_tensor", s.largest_tensor},
          {"largest_tensor_bytes", s.largest_tensor_bytes}};
}

}  // namespace

int cmd_plan(const Args& args) {
  std::string config_path, path_text;
  std::vector<std::string> overrides, plugins, plugin_args;
  int64_t nproc = 0;
  po::options_description options("keel plan");
  add_config_options(options, config_path, overrides);
  add_plugin_options(options, plugins, plugin_args);
  // clang-format off
  options.add_options()
      ("nproc", po::value<int64_t>(&nproc), "ranks of the job: sets parallel.dp = N / (parallel.tp x parallel.pp)")
      ("path", po::value<std::string>(&path_text),
       "fused (CUDA kernels, fused attention) | reference (LibTorch ops, math attention); default from train.device")
      ("json", "print one JSON object instead of text (docs/cli.md)")
      ("help", "show this help");
  // clang-format on
  const auto vm = parse_args(args, options, "plan");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  const bool json = vm.count("json") > 0;
  if (json) metrics::setup_logging();
  append_plugin_overrides(plugins, plugin_args, overrides);
  if (vm.count("nproc")) {
    const Config layout = load_config(config_path, overrides);
    const int64_t model_parallel = layout.parallel.tp * layout.parallel.pp;
    if (nproc < 1 || nproc % model_parallel != 0) {
      throw std::runtime_error("keel plan: --nproc " + std::to_string(nproc) +
                               " is not a multiple of parallel.tp x parallel.pp = " + std::to_string(model_parallel));
    }
    overrides.push_back("parallel.dp=" + std::to_string(nproc / model_parallel));
  }
  const Config config = load_config(config_path, overrides);
  plan::KernelPath path = plan::default_path(config);
  if (path_text == "fused") {
    path = plan::KernelPath::kFused;
  } else if (path_text == "reference") {
    path = plan::KernelPath::kReference;
  } else if (!path_text.empty()) {
    throw std::runtime_error("keel plan: --path is '" + path_text + "', expected fused or reference");
  }
  const plan::Plan p = plan::make_plan(config, path);

  if (json) {
    nlohmann::json stages = nlohmann::json::array();
    for (const plan::StagePlan& s : p.stages) stages.push_back(stage_json(s));
    print_json({{"file", config_path},
                {"parameters", p.parameters},
                {"largest_parameter", {{"name", p.largest_parameter}, {"elements", p.largest_parameter_elements}}},
                {"layout",
                 {{"dp", config.parallel.dp},
                  {"tp", config.parallel.tp},
                  {"pp", config.parallel.pp},
                  {"zero", config.parallel.zero},
                  {"microbatches", p.microbatches},
                  {"microbatch_sequences", p.microbatch_sequences},
                  {"seq_len", config.model.seq_len},
                  {"sp", config.parallel.sp},
                  {"recompute", name_of(config.model.recompute)}}},
                {"path", plan::path_name(p.path)},
                {"precision", name_of(config.train.precision)},
                {"optimizer_state", p.optimizer_state},
                {"per_rank", stages},
                {"comm_bytes_per_step", {{"dp", p.comm.dp_bytes}, {"tp", p.comm.tp_bytes}, {"pp", p.comm.pp_bytes}}}});
    return 0;
  }
  std::cout << config_path << ": " << billions(p.parameters) << " parameters (largest tensor " << p.largest_parameter
            << "); layout dp " << config.parallel.dp << " x tp " << config.parallel.tp << " x pp " << config.parallel.pp
            << (config.parallel.zero == 1 ? ", ZeRO-1" : "") << (config.parallel.sp ? ", SP" : "")
            << (config.model.recompute != Recompute::kNone ? ", recompute " + name_of(config.model.recompute) : "")
            << "; " << p.microbatches << " micro-batches of " << p.microbatch_sequences << " x " << config.model.seq_len
            << " tokens; " << plan::path_name(p.path) << " path, " << name_of(config.train.precision) << "; optimizer "
            << p.optimizer_state << "\n";
  for (const plan::StagePlan& s : p.stages) {
    std::cout << "stage " << s.pp_rank << " (layers " << s.first_layer << "-" << s.first_layer + s.layers - 1
              << (s.embedding ? ", embedding" : "") << (s.head ? ", head" : "") << "; " << s.ranks
              << " ranks): " << gib(s.total_bytes) << " per rank = params " << gib(s.params_bytes) << " + grads "
              << gib(s.grads_bytes) << " + optimizer " << gib(s.optimizer_bytes) << " + " << s.inflight_microbatches
              << " in flight x (weight copies " << gib(s.weight_copy_bytes) << " + activations "
              << gib(s.activation_bytes) << ") + workspace " << gib(s.workspace_bytes) << "; largest tensor "
              << s.largest_tensor << " " << gib(s.largest_tensor_bytes) << "\n";
  }
  std::cout << "per step and rank: DP " << gib(p.comm.dp_bytes) << ", TP " << gib(p.comm.tp_bytes) << ", PP "
            << gib(p.comm.pp_bytes) << " sent\n";
  return 0;
}

}  // namespace keel::cli

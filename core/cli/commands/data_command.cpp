// Why: `keel data prepare` (tokenizer + shards for a config, idempotent), `keel data show-batch` (any batch of an
// unstarted config, --config, or of a run as it trained, --run: branches, swaps and rollbacks included) and
// `keel data compare-order` (how paired two runs' data orders are after their common branch point).
#include <spdlog/spdlog.h>

#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/data/documents.h"
#include "core/data/loader.h"
#include "core/data/prepare.h"
#include "core/data/run_order.h"
#include "core/data/show_batch.h"
#include "core/metrics/logger.h"

namespace keel::cli {
namespace {

const char* const kUsage =
    "usage: keel data prepare --config FILE [--force] | show-batch (--config FILE | --run RUN_DIR) --step N [--to M] "
    "[--json] | compare-order RUN_A RUN_B [--steps S..E] [--json]";

// "S..E" -> (S, E); one-line error naming the option otherwise.
std::pair<int64_t, int64_t> parse_step_range(const std::string& text) {
  const size_t dots = text.find("..");
  try {
    if (dots != std::string::npos) {
      size_t used_a = 0, used_b = 0;
      const std::string a = text.substr(0, dots), b = text.substr(dots + 2);
      const int64_t first = std::stoll(a, &used_a), last = std::stoll(b, &used_b);
      if (used_a == a.size() && used_b == b.size() && first >= 0 && last >= first) return {first, last};
    }
  } catch (const std::exception&) {
  }
  throw std::runtime_error("--steps '" + text + "': expected S..E with 0 <= S <= E");
}

int show_batch(const po::variables_map& vm, const std::string& config_path, const std::vector<std::string>& overrides,
               int64_t step, int64_t to, int64_t show_tokens) {
  const bool has_run = vm.count("run") > 0;
  if (has_run == !config_path.empty()) throw std::runtime_error("show-batch: give exactly one of --config or --run");
  if (step < 0) throw std::runtime_error("show-batch: --step must be >= 0, got " + std::to_string(step));
  if (to < 0) to = step;
  if (to < step) throw std::runtime_error("show-batch: --to " + std::to_string(to) + " is before --step");
  const bool json = vm.count("json") > 0;
  std::optional<data::RunOrder> run;
  std::optional<data::DataLoader> config_loader;
  std::vector<data::BatchPlan> plans;
  if (has_run) {
    run.emplace(vm["run"].as<std::string>(), overrides);
    plans = run->plans(step, to);
  } else {
    const Config config = load_config(config_path, overrides);
    config_loader.emplace(config, config.global_batch());
    config_loader->seek(step);
    while (config_loader->step() <= to) plans.push_back(config_loader->plan_next());
  }
  const data::DataLoader& loader = run ? run->loader() : *config_loader;
  const data::DocumentIndex documents(loader.dir(), loader.source_names());
  for (const auto& plan : plans) {
    if (json) {
      std::cout << data::batch_json(loader, documents, plan, show_tokens)
                       .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                << "\n";
    } else {
      std::cout << data::batch_text(loader, documents, plan, show_tokens);
    }
  }
  return 0;
}

}  // namespace

int cmd_data(const Args& args) {
  const std::string usage = kUsage;
  if (args.empty()) throw std::runtime_error(usage);
  const std::string sub = args[0];
  if (sub == "--help" || sub == "-h") {
    std::cout << usage << "\n  prepare        train (or reuse) the tokenizer and write the token shards of data.dir\n"
              << "  show-batch     the global batch of step N (of a config, or of a run as it trained): source, "
                 "sample id, epoch, chunk, documents, first tokens\n"
              << "  compare-order  how many batch slots two runs filled with the same source / sample after their "
                 "common branch point, and the share expected\n"
              << "keel data SUBCOMMAND --help: its options\n";
    return 0;
  }
  if (sub != "prepare" && sub != "show-batch" && sub != "compare-order")
    throw std::runtime_error("unknown subcommand '" + sub + "'; " + usage);
  std::string config_path;
  std::vector<std::string> overrides;
  int64_t step = 0;
  int64_t to = -1;
  int64_t show_tokens = 16;
  std::string steps;
  po::options_description options("keel data " + sub);
  if (sub == "prepare") {
    add_config_options(options, config_path, overrides);
    options.add_options()("force", "rebuild the tokenizer and every shard even if the prepared data looks up to date");
  }
  // clang-format off
  if (sub == "show-batch")
    options.add_options()
        ("config", po::value<std::string>(&config_path), "INI config file of an unstarted run")
        ("run", po::value<std::string>(), "a run directory: the batch as that run trained it")
        ("set", po::value<std::vector<std::string>>(&overrides)->composing(),
         "key=value applied to the config (with --run: to the run's config.ini, e.g. data.dir)")
        ("step", po::value<int64_t>(&step)->required(), "step whose global batch to show (steps count from 0)")
        ("to", po::value<int64_t>(&to), "show every step from --step to this one")
        ("tokens", po::value<int64_t>(&show_tokens)->default_value(16), "tokens shown per sample")
        ("json", "one JSON object per step and line: {\"step\": N, \"samples\": [...]}");
  if (sub == "compare-order")
    options.add_options()
        ("steps", po::value<std::string>(&steps), "S..E: only these steps (inclusive)")
        ("json", "print the comparison as JSON");
  // clang-format on
  options.add_options()("help", "show this help");
  std::vector<std::string> positional;
  auto vm = parse_args(Args(args.begin() + 1, args.end()), options, "data " + sub,
                       sub == "compare-order" ? &positional : nullptr);
  if (vm.count("help")) {
    if (sub == "compare-order") std::cout << "usage: keel data compare-order RUN_A RUN_B [--steps S..E] [--json]\n";
    std::cout << options;
    return 0;
  }
  metrics::setup_logging();
  if (sub == "show-batch") return show_batch(vm, config_path, overrides, step, to, show_tokens);
  if (sub == "compare-order") {
    if (positional.size() != 2)
      throw std::runtime_error("compare-order: expected two run directories, got " + std::to_string(positional.size()) +
                               " (see keel data compare-order --help)");
    std::optional<std::pair<int64_t, int64_t>> range;
    if (!steps.empty()) range = parse_step_range(steps);
    const nlohmann::json j = data::compare_order(positional[0], positional[1], range);
    if (vm.count("json")) {
      print_json(j);
      return 0;
    }
    std::cout << "compare-order " << positional[0] << " vs " << positional[1] << ": steps "
              << j["first_step"].get<int64_t>() << ".." << j["last_step"].get<int64_t>() << " (branch step "
              << j["branch_step"].get<int64_t>() << "), " << j["slots"].get<int64_t>() << " slots\n"
              << "  same source: " << j["same_source_share"].get<double>()
              << " of slots (expected under the coupling: " << j["expected_same_source_share"].get<double>()
              << "); same sample: " << j["same_sample_share"].get<double>() << "\n";
    for (const auto& [name, counts] : j["sources"].items()) {
      std::cout << "  " << name << ": same source " << counts["same_source"].get<int64_t>() << ", same sample "
                << counts["same_sample"].get<int64_t>() << "\n";
    }
    return 0;
  }
  Config config = load_config(config_path, overrides);
  data::PrepareOptions prepare_options;
  prepare_options.force = vm.count("force") > 0;
  data::prepare_data(config, prepare_options);
  std::cout << "prepared data: " << config.data.dir << "\n";
  return 0;
}

}  // namespace keel::cli

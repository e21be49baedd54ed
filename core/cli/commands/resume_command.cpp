// Why: `keel resume --from RUN_DIR|CKPT_DIR --run-dir NEW_DIR [--set k=v]... [--allow-data-change]` continues a
// run from a checkpoint, exactly when nothing changes and as a recorded branch when something does. This file
// parses the flags, resolves and verifies the checkpoint (printing its warnings), and hands over: what may be
// resumed and how is train::plan_resume's decision (core/train/resume_plan.h, which lists the refusals in
// order), running it is train::run_on_ranks's (core/train/run_ranks.h). `--skip-list FILE` adds the file's skip
// rules (train::read_skip_list) to the config's data.skip from the resume step on: the branch's lineage records the
// change and the file, and its data order passes over exactly those samples (cumulative with the checkpoint's and
// the parent run's rules).
#include <iostream>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/train/resume_plan.h"
#include "core/train/run_ranks.h"
#include "core/train/skip_rules.h"

namespace keel::cli {
namespace {

// --skip-list FILE: its rules (checked against the checkpoint's sources) appended to data.skip as an override.
// Returns the lineage note.
std::string add_skip_list(const std::string& file, const checkpoint::ResolvedCheckpoint& ckpt,
                          std::vector<std::string>& overrides) {
  const Config base = load_config(ckpt.dir + "/config.ini", overrides);
  std::vector<std::string> sources;
  for (const auto& source : base.data.sources) sources.push_back(source.name);
  const std::vector<std::string> specs = train::read_skip_list(file, sources);
  std::string skip = base.data.skip, added;
  for (const auto& spec : specs) {
    skip += (skip.empty() ? "" : ";") + spec;
    added += (added.empty() ? "" : ";") + spec;
  }
  overrides.push_back("data.skip=" + skip);
  return std::string(train::kSkipListNote) + file + ": " + std::to_string(specs.size()) + " rule(s) from step " +
         std::to_string(ckpt.manifest.step) + ": " + added;
}

}  // namespace

int cmd_resume(const Args& args) {
  std::string from, run_dir, skip_list;
  std::vector<std::string> overrides, plugins, plugin_args;
  po::options_description options("keel resume");
  add_plugin_options(options, plugins, plugin_args);
  options.add_options()("from", po::value<std::string>(&from)->required(),
                        "a run dir (its latest valid checkpoint) or a checkpoint dir")(
      "run-dir", po::value<std::string>(&run_dir)->required(),
      "new directory for this run (never the one resumed from)")(
      "set", po::value<std::vector<std::string>>(&overrides)->composing(),
      "override a key: --set section.key=value (repeatable)")(
      "skip-list", po::value<std::string>(&skip_list),
      "a skip list file (data.skip rules, e.g. from keel forensics) to skip from the resume step on")(
      "allow-data-change", "accept data that differs from the checkpoint's (recorded in the lineage)")(
      "force", "replace an existing run in --run-dir")("help", "show this help");
  auto vm = parse_args(args, options, "resume");
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  const bool allow_data_change = vm.count("allow-data-change") > 0;
  append_plugin_overrides(plugins, plugin_args, overrides);

  // 1. Which checkpoint; verified. Its warnings come first, before any refusal of what follows.
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(from);
  for (const auto& w : ckpt.warnings) std::cerr << "keel resume: warning: " << w << "\n";
  const std::string skip_note = skip_list.empty() ? "" : add_skip_list(skip_list, ckpt, overrides);
  train::ResumePlan plan = train::plan_resume(ckpt, run_dir, overrides, allow_data_change);
  if (!skip_note.empty()) plan.lineage.notes.push_back(skip_note);

  train::RunRequest request;
  request.lineage = std::move(plan.lineage);
  request.config = std::move(plan.config);
  request.loader = std::move(plan.loader);
  request.run_dir = run_dir;
  request.force = vm.count("force") > 0;
  request.resume = &plan.state;
  request.allow_data_change = allow_data_change;
  request.description = "resume: from " + ckpt.dir + " (step " + std::to_string(ckpt.manifest.step) + ")";
  request.on_distributed_error = [](const std::string& message) { exit_on_distributed_error("resume", message); };
  return train::run_on_ranks(std::move(request));
}

}  // namespace keel::cli

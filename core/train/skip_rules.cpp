// Why: see skip_rules.h. The file is small (one line per rule) and written only when a rollback adds rules.
#include "core/train/skip_rules.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/checkpoint/durable_fs.h"
#include "core/data/loader.h"
#include "core/train/trainer_state.h"

namespace keel::train {

std::string skip_rules_file(const std::string& run_dir) { return run_dir + "/skip_rules.json"; }

void record_skip_rules(TrainerState& s) {
  if (!s.rank0()) return;
  const nlohmann::json doc = {{"format", "keel-skip-rules"},
                              {"version", 1},
                              {"step", s.loader->step()},
                              {"skip", s.loader->state().at("skip")}};
  checkpoint::write_file_atomically(skip_rules_file(s.paths.root), doc.dump(1) + "\n");
}

std::vector<std::string> carry_parent_skip_rules(TrainerState& s) {
  const std::string parent = s.lineage.parent_run_dir;
  const std::string path = skip_rules_file(parent);
  // Rank 0 reads; "" = no file, "!reason" = unreadable, otherwise the text.
  std::string text;
  if (s.rank0() && !parent.empty()) {
    std::error_code ec;
    if (std::filesystem::exists(path, ec)) {
      try {
        text = checkpoint::read_small_file(path, 16 << 20);
        if (text.empty()) text = "!empty file";
      } catch (const std::exception& e) {
        text = std::string("!") + e.what();
      }
    }
  }
  text = s.groups.world->broadcast_string(text, 0);
  if (text.empty()) return {};
  std::string problem = text[0] == '!' ? text.substr(1) : "";
  std::vector<std::string> lines;
  if (problem.empty()) {
    try {
      const nlohmann::json doc = nlohmann::json::parse(text);
      if (doc.value("format", "") != "keel-skip-rules" || doc.value("version", 0) != 1) {
        problem = "not a version 1 keel-skip-rules file";
      } else {
        lines = s.loader->carry_skip(doc.at("skip"), /*from_now=*/false);
      }
    } catch (const std::exception& e) {
      problem = e.what();
    }
  }
  if (!problem.empty()) {
    const std::string warning = "skip rules of the parent run not carried: " + path + ": " + problem +
                                " (only the checkpoint's own skip rules apply)";
    if (s.rank0()) spdlog::warn("{}", warning);
    return {"warning: " + warning};
  }
  return lines;
}

}  // namespace keel::train

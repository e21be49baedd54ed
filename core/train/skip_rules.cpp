// Why: see skip_rules.h. The file is small (one line per rule) and written only when a rollback adds rules.
#include "core/train/skip_rules.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "core/checkpoint/durable_fs.h"
#include "core/data/loader.h"
#include "core/data/mixture.h"
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

std::vector<std::string> read_skip_list(const std::string& path, const std::vector<std::string>& sources) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw std::runtime_error(path + ": no such skip list file");
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open the skip list");
  std::vector<std::string> specs;
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    line.erase(std::remove_if(line.begin(), line.end(), [](unsigned char c) { return std::isspace(c); }), line.end());
    if (line.empty()) continue;
    const std::string where = path + ":" + std::to_string(line_number);
    try {
      for (const auto& rule : data::parse_skip(line, sources, 0, where)) specs.push_back(rule.spec);
    } catch (const std::exception& e) {
      const std::string message = e.what();
      throw std::runtime_error(message.rfind(where, 0) == 0 ? message : where + ": " + message);
    }
  }
  if (specs.empty()) throw std::runtime_error(path + ": the skip list holds no rule");
  return specs;
}

void record_skip_list(TrainerState& s) {
  const auto& notes = s.lineage.notes;
  const bool given =
      std::any_of(notes.begin(), notes.end(), [](const std::string& n) { return n.rfind(kSkipListNote, 0) == 0; });
  if (given) record_skip_rules(s);
}

}  // namespace keel::train

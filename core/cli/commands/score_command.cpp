// Why: `keel score CKPT_DIR|RUN_DIR (--tokens FILE.npy | --text FILE) [--json]`: per-token log-probabilities
// and per-sequence NLL of given tokens or text under a checkpoint, in fp32 (docs/eval.md). The command parses,
// resolves the checkpoint and prints; the scoring lives in core/eval/score.{h,cpp}.
#include <spdlog/spdlog.h>

#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/resharding.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/data/tokenizer.h"
#include "core/eval/eval.h"
#include "core/eval/score.h"
#include "core/io/regular_file.h"

namespace keel::cli {
namespace {

// One sequence per non-empty line of `path`, tokenized with the checkpoint's tokenizer (no EOS added).
std::vector<std::vector<int64_t>> text_rows(const std::string& path, const Config& config) {
  io::require_regular_file<std::runtime_error>(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) lines.push_back(line);
  }
  const data::Tokenizer tokenizer(config.data.dir + "/tokenizer.model");
  std::vector<std::vector<int64_t>> rows;
  for (const auto& ids : tokenizer.encode_batch(lines)) rows.emplace_back(ids.begin(), ids.end());
  return rows;
}

}  // namespace

int cmd_score(const Args& args) {
  const std::string usage_line = "keel score CKPT_DIR|RUN_DIR (--tokens FILE.npy | --text FILE) [--json]";
  Args positional;
  std::string tokens_path, text_path;
  po::options_description options("keel score CKPT_DIR|RUN_DIR");
  // clang-format off
  options.add_options()
      ("tokens", po::value<std::string>(&tokens_path), "2-D integer .npy: one sequence per row")
      ("text", po::value<std::string>(&text_path),
       "text file: one sequence per non-empty line, tokenized with the checkpoint's tokenizer (no EOS added)")
      ("json", "print {\"sequences\": [{\"nll\", \"tokens\", \"logprobs\"}...], \"mean_nll\"} on stdout")
      ("help", "show this help");
  // clang-format on
  auto vm = parse_args(args, options, "score", &positional);
  if (vm.count("help")) {
    std::cout << usage_line << "\n" << options;
    return 0;
  }
  if (positional.size() != 1)
    throw std::runtime_error("expected 1 argument, got " + std::to_string(positional.size()) +
                             "; usage: " + usage_line);
  if (tokens_path.empty() == text_path.empty())
    throw std::runtime_error("give exactly one of --tokens FILE.npy and --text FILE; usage: " + usage_line);
  const bool json_out = vm.count("json") > 0;
  if (json_out) spdlog::set_level(spdlog::level::warn);  // stdout carries the JSON object alone

  const checkpoint::ResolvedCheckpoint resolved = checkpoint::resolve_checkpoint(positional[0]);
  for (const auto& w : resolved.warnings) spdlog::warn("{}", w);
  const Config config = load_config(resolved.dir + "/config.ini");
  const std::vector<std::vector<int64_t>> rows =
      tokens_path.empty() ? text_rows(text_path, config) : eval::read_npy_rows(tokens_path);
  const std::string input = tokens_path.empty() ? text_path : tokens_path;
  const checkpoint::TrainingState state = checkpoint::read_lazy_state(resolved.dir, resolved.manifest, -1);
  const model::Llama model = eval::load_model(config, state, resolved.dir);
  std::vector<eval::SequenceScore> scores;
  try {
    scores = eval::score_rows(model, rows, config.model.vocab, config.model.seq_len + 1);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(input + ": " + e.what());
  }
  double sum = 0.0;
  for (const auto& s : scores) sum += s.nll;
  const double mean = scores.empty() ? 0.0 : sum / static_cast<double>(scores.size());
  if (json_out) {
    nlohmann::json sequences = nlohmann::json::array();
    for (const auto& s : scores) sequences.push_back({{"nll", s.nll}, {"tokens", s.tokens}, {"logprobs", s.logprobs}});
    print_json({{"checkpoint", resolved.dir},
                {"step", resolved.manifest.step},
                {"sequences", sequences},
                {"mean_nll", scores.empty() ? nlohmann::json(nullptr) : nlohmann::json(mean)}});
    return 0;
  }
  std::cout << "checkpoint " << resolved.dir << " (step " << resolved.manifest.step << "), " << input << "\n"
            << std::setprecision(9);
  for (size_t i = 0; i < scores.size(); ++i)
    std::cout << "sequence " << i << ": " << scores[i].tokens << " tokens, nll " << scores[i].nll << "\n";
  std::cout << "mean nll " << mean << " over " << scores.size() << " sequences\n";
  return 0;
}

}  // namespace keel::cli

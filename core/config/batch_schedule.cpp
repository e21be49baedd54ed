// Why: see batch_schedule.h. Parsing is strict (a typo in a batch schedule silently changes how many samples
// every later step trains on), and each error names train.batch_schedule and the entry or step at fault.
#include "core/config/batch_schedule.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace keel {
namespace {

constexpr const char* kKey = "train.batch_schedule";

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// A non-negative decimal integer, or a ConfigError naming the key, the entry and the text.
int64_t parse_count(const std::string& s, const std::string& what, const std::string& item, const std::string& text) {
  errno = 0;
  const long long v =
      s.empty() || s.find_first_not_of("0123456789") != std::string::npos ? -1 : std::strtoll(s.c_str(), nullptr, 10);
  if (v < 0 || errno == ERANGE) {
    throw ConfigError(std::string(kKey) + ": " + what + " must be a non-negative integer, got '" + s + "' in '" + item +
                      "' of \"" + text + "\"");
  }
  return v;
}

}  // namespace

std::vector<BatchStage> parse_batch_schedule(const std::string& text) {
  std::vector<BatchStage> stages;
  std::istringstream in(text);
  std::string item;
  while (std::getline(in, item, ';')) {
    item = trim(item);
    if (item.empty()) continue;
    const size_t colon = item.find(':');
    if (colon == std::string::npos) {
      throw ConfigError(std::string(kKey) + ": expected STEP:BATCH (e.g. 0:8;100:16), got '" + item + "' in \"" + text +
                        "\"");
    }
    BatchStage stage;
    stage.from_step = parse_count(trim(item.substr(0, colon)), "the step", item, text);
    stage.global_batch = parse_count(trim(item.substr(colon + 1)), "the global batch", item, text);
    stage.origin = kKey;
    if (stage.global_batch < 1) {
      throw ConfigError(std::string(kKey) + ": the global batch from step " + std::to_string(stage.from_step) +
                        " must be >= 1 sequence, got 0");
    }
    if (stages.empty() && stage.from_step != 0) {
      throw ConfigError(std::string(kKey) + ": the first entry must be at step 0, got step " +
                        std::to_string(stage.from_step) + " in \"" + text + "\"");
    }
    if (!stages.empty() && stage.from_step <= stages.back().from_step) {
      throw ConfigError(std::string(kKey) + ": steps must increase, but step " + std::to_string(stage.from_step) +
                        " follows step " + std::to_string(stages.back().from_step) + " in \"" + text + "\"");
    }
    stages.push_back(stage);
  }
  if (stages.empty()) throw ConfigError(std::string(kKey) + ": no STEP:BATCH entry in \"" + text + "\"");
  return stages;
}

std::vector<BatchStage> batch_stages(const Config& config) {
  if (!trim(config.train.batch_schedule).empty()) return parse_batch_schedule(config.train.batch_schedule);
  return {BatchStage{0, config.global_batch(), "train.grad_accum"}};
}

int64_t batch_at(const std::vector<BatchStage>& stages, int64_t step) {
  int64_t batch = stages.empty() ? 0 : stages.front().global_batch;
  for (const auto& s : stages) {
    if (s.from_step <= step) batch = s.global_batch;
  }
  return batch;
}

void validate_batch_schedule(const Config& c) {
  if (trim(c.train.batch_schedule).empty()) return;
  std::vector<BatchStage> stages;
  try {
    stages = parse_batch_schedule(c.train.batch_schedule);
  } catch (const ConfigError& e) {
    throw ConfigError(std::string("invalid config: ") + e.what());
  }
  const int64_t first = c.train.micro_batch * c.train.grad_accum;
  if (stages.front().global_batch != first) {
    throw ConfigError("invalid config: " + std::string(kKey) + ": the global batch at step 0 (" +
                      std::to_string(stages.front().global_batch) + ") must be train.micro_batch x train.grad_accum (" +
                      std::to_string(c.train.micro_batch) + " x " + std::to_string(c.train.grad_accum) + " = " +
                      std::to_string(first) + ")");
  }
  // Every rank runs micro-batches of the same size at every step: only their number follows the schedule.
  const int64_t micro = c.rank_micro_batch();
  const int64_t unit = c.parallel.dp * micro;
  for (const auto& s : stages) {
    int64_t tokens = 0;
    if (__builtin_mul_overflow(s.global_batch, c.model.seq_len, &tokens)) {
      throw ConfigError("invalid config: " + std::string(kKey) + ": the global batch from step " +
                        std::to_string(s.from_step) + " x model.seq_len must fit in a 64-bit integer");
    }
    if (s.global_batch % unit != 0) {
      throw ConfigError(
          "invalid config: " + std::string(kKey) + ": the global batch from step " + std::to_string(s.from_step) +
          " (" + std::to_string(s.global_batch) + ") must be divisible by parallel.dp x the micro-batch of a rank (" +
          std::to_string(c.parallel.dp) + " x " + std::to_string(micro) + " = " + std::to_string(unit) + ")");
    }
  }
}

}  // namespace keel

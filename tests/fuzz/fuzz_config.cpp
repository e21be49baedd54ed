// Why: experiment configs come from outside (hand-written INI files, `--set` arguments, configs copied between
// machines), and the parser is strict on purpose. This target checks that strictness holds for *any* bytes:
// every input either parses or throws ConfigError — never a crash, a sanitizer report, a hang or another
// exception type. It also checks two promises the rest of Keel builds on:
//   1. the resolved config round-trips: parse(to_ini(c)) gives back c (run dirs store to_ini(c) and resume
//      from it);
//   2. the data strings inside a valid config (data.mixture, data.schedule, data.skip), parsed against the
//      config's sources exactly as the data loader parses them, either parse into usable values (finite
//      weights with a positive, finite sum; ordered ranges) or throw DataError.
// Input layout: INI text, then optionally a NUL byte followed by `--set` overrides, one per line.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/data/mixture.h"

namespace {

[[noreturn]] void broken_promise(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_config: %s\n%s\n", what, detail.c_str());
  std::abort();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = text.find('\n', begin);
    lines.push_back(text.substr(begin, end == std::string::npos ? std::string::npos : end - begin));
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  return lines;
}

void check_weights(const std::vector<double>& weights, size_t sources, const std::string& text) {
  if (weights.size() != sources) broken_promise("weights vector does not have one entry per source", text);
  double sum = 0;
  for (double w : weights) {
    if (!std::isfinite(w) || w < 0) broken_promise("parsed a weight that is negative or not finite", text);
    sum += w;
  }
  if (!(sum > 0) || !std::isfinite(sum)) broken_promise("parsed weights whose sum is 0 or not finite", text);
}

// What DataLoader does with the data strings of a config, minus the shards.
void check_data_strings(const keel::Config& config) {
  std::vector<std::string> names;
  for (const auto& source : config.data.sources) names.push_back(source.name);
  try {
    if (!config.data.mixture.empty())
      check_weights(keel::data::parse_weights(config.data.mixture, names, "data.mixture"), names.size(),
                    config.data.mixture);
  } catch (const keel::data::DataError&) {
  }
  try {
    const auto stages = keel::data::parse_schedule(config.data.schedule, names, "data.schedule");
    for (size_t i = 0; i < stages.size(); ++i) {
      check_weights(stages[i].weights, names.size(), config.data.schedule);
      if (stages[i].from_step < 0 || (i > 0 && stages[i].from_step <= stages[i - 1].from_step))
        broken_promise("schedule stages not strictly increasing from step >= 0", config.data.schedule);
    }
  } catch (const keel::data::DataError&) {
  }
  try {
    for (const auto& rule : keel::data::parse_skip(config.data.skip, names, 0, "data.skip")) {
      if (rule.first < 0 || rule.last < rule.first || rule.source < 0 ||
          static_cast<size_t>(rule.source) >= names.size())
        broken_promise("skip rule with a bad range or source", config.data.skip);
      // The canonical spec must parse back to the same rule (the ledger stores specs).
      const auto again = keel::data::parse_skip(rule.spec, names, 0, "ledger");
      if (again.size() != 1 || again[0].first != rule.first || again[0].last != rule.last ||
          again[0].source != rule.source || again[0].kind != rule.kind)
        broken_promise("skip rule spec does not parse back to the same rule", rule.spec);
    }
  } catch (const keel::data::DataError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string ini = input.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string::npos) overrides = lines_of(input.substr(nul + 1));

  keel::Config config;
  try {
    config = keel::parse_config_text(ini, "fuzz.ini", overrides);
  } catch (const keel::ConfigError&) {
    return 0;  // the documented way to refuse a config
  }
  // Exercised by every command that prints or stores a config.
  (void)config.global_batch();
  (void)config.tokens_per_step();
  const std::string resolved = keel::to_ini(config);
  try {
    const keel::Config again = keel::parse_config_text(resolved, "resolved.ini");
    if (keel::flatten(again) != keel::flatten(config)) broken_promise("resolved config does not round-trip", resolved);
  } catch (const keel::ConfigError& e) {
    broken_promise("resolved config is refused when read back", std::string(e.what()) + "\n" + resolved);
  }
  check_data_strings(config);
  return 0;
}

// Why: see mixture.h. Parsing is strict (unknown sources, negative weights, reversed ranges are errors), since a
// typo in a mixture silently changes what a model is trained on.
#include "core/data/mixture.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "core/data/data_error.h"

namespace keel::data {
namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(trim(part));
  if (!s.empty() && s.back() == sep) parts.push_back("");
  return parts;
}

std::string known(const std::vector<std::string>& sources) {
  std::string out;
  for (const auto& s : sources) out += (out.empty() ? "" : ", ") + s;
  return out;
}

int32_t source_index(const std::string& name, const std::vector<std::string>& sources, const std::string& origin,
                     const std::string& text) {
  const auto it = std::find(sources.begin(), sources.end(), name);
  if (it == sources.end()) {
    throw DataError(origin + ": unknown source '" + name + "' in \"" + text + "\" (sources: " + known(sources) + ")");
  }
  return static_cast<int32_t>(it - sources.begin());
}

int64_t parse_int(const std::string& s, const std::string& origin, const std::string& text) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) {
    throw DataError(origin + ": expected a non-negative integer, got '" + s + "' in \"" + text + "\"");
  }
  errno = 0;
  const long long v = std::strtoll(s.c_str(), nullptr, 10);
  if (errno == ERANGE) throw DataError(origin + ": integer '" + s + "' out of range in \"" + text + "\"");
  return v;
}

}  // namespace

std::vector<double> parse_weights(const std::string& text, const std::vector<std::string>& sources,
                                  const std::string& origin) {
  std::vector<double> weights(sources.size(), 0.0);
  std::vector<bool> seen(sources.size(), false);
  for (const auto& item : split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      throw DataError(origin + ": expected name=weight, got '" + item + "' in \"" + text + "\"");
    }
    const std::string name = trim(item.substr(0, eq));
    const std::string value = trim(item.substr(eq + 1));
    const int32_t i = source_index(name, sources, origin, text);
    if (seen[i]) throw DataError(origin + ": source '" + name + "' given twice in \"" + text + "\"");
    seen[i] = true;
    char* end = nullptr;
    const double w = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || !std::isfinite(w) || w < 0) {
      throw DataError(origin + ": weight of '" + name + "' must be a finite number >= 0, got '" + value + "' in \"" +
                      text + "\"");
    }
    weights[i] = w;
  }
  double sum = 0;
  for (double w : weights) sum += w;
  if (!(sum > 0)) throw DataError(origin + ": weights sum to 0 in \"" + text + "\"");
  // An infinite sum would normalise every weight to 0 and silently train on the first source only.
  if (!std::isfinite(sum)) throw DataError(origin + ": weights sum to more than a double holds in \"" + text + "\"");
  return weights;
}

std::vector<MixtureStage> parse_schedule(const std::string& text, const std::vector<std::string>& sources,
                                         const std::string& origin) {
  std::vector<MixtureStage> stages;
  for (const auto& item : split(text, ';')) {
    if (item.empty()) continue;
    const size_t colon = item.find(':');
    if (colon == std::string::npos) {
      throw DataError(origin + ": expected STEP:name=weight,..., got '" + item + "' in \"" + text + "\"");
    }
    MixtureStage stage;
    stage.from_step = parse_int(trim(item.substr(0, colon)), origin, text);
    stage.weights = parse_weights(item.substr(colon + 1), sources, origin);
    stage.origin = origin;
    for (const auto& s : stages) {
      if (s.from_step == stage.from_step) {
        throw DataError(origin + ": two stages start at step " + std::to_string(stage.from_step) + " in \"" + text +
                        "\"");
      }
    }
    stages.push_back(std::move(stage));
  }
  std::stable_sort(stages.begin(), stages.end(),
                   [](const MixtureStage& a, const MixtureStage& b) { return a.from_step < b.from_step; });
  return stages;
}

std::vector<SkipRule> parse_skip(const std::string& text, const std::vector<std::string>& sources, int64_t from_step,
                                 const std::string& origin) {
  std::vector<SkipRule> rules;
  for (const auto& item : split(text, ';')) {
    if (item.empty()) continue;
    const auto parts = split(item, ':');
    if (parts.size() != 3) {
      throw DataError(origin + ": expected SOURCE:chunk:A[-B] or SOURCE:samples:A[-B], got '" + item + "' in \"" +
                      text + "\"");
    }
    SkipRule rule;
    rule.source = source_index(parts[0], sources, origin, text);
    if (parts[1] == "chunk" || parts[1] == "chunks") {
      rule.kind = SkipRule::Kind::kChunk;
    } else if (parts[1] == "samples" || parts[1] == "sample") {
      rule.kind = SkipRule::Kind::kSamples;
    } else {
      throw DataError(origin + ": skip kind must be 'chunk' or 'samples', got '" + parts[1] + "' in \"" + text + "\"");
    }
    const size_t dash = parts[2].find('-');
    rule.first = parse_int(trim(parts[2].substr(0, dash)), origin, text);
    rule.last = dash == std::string::npos ? rule.first : parse_int(trim(parts[2].substr(dash + 1)), origin, text);
    if (rule.last < rule.first) {
      throw DataError(origin + ": reversed range '" + parts[2] + "' in \"" + text + "\"");
    }
    rule.from_step = from_step;
    rule.origin = origin;
    rule.spec = parts[0] + ":" + (rule.kind == SkipRule::Kind::kChunk ? "chunk" : "samples") + ":" +
                std::to_string(rule.first) +
                (rule.last != rule.first ? "-" + std::to_string(rule.last) : std::string());
    rules.push_back(std::move(rule));
  }
  return rules;
}

std::string format_weights(const std::vector<double>& weights, const std::vector<std::string>& sources) {
  std::ostringstream out;
  for (size_t i = 0; i < weights.size() && i < sources.size(); ++i) {
    out << (i ? "," : "") << sources[i] << "=" << weights[i];
  }
  return out.str();
}

}  // namespace keel::data

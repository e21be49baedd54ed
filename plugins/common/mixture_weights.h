// Why: the three built-in data_mixture plugins (static, staged, linear_ramp) read and write the same weights
// language as data.mixture ("prose=0.7,code=0.3", docs/data.md); the parsing, the checks and the formatting live
// here once, header-only (this folder has no CMakeLists.txt, so it is not built as a plugin). Checks, with
// std::invalid_argument errors naming the plugin, the argument and the bad part: every item is NAME=WEIGHT, a
// name is non-empty and given once, a weight is a finite number >= 0, the weights sum to a finite number > 0.
// Source names are checked against the run's sources only in mixture_at (the constructor does not know them).
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "keel/plugin.h"

namespace keel::plugins {

// Source name -> weight, in the order written.
using Weights = std::vector<std::pair<std::string, double>>;

inline std::string trim(const std::string& s) {
  const size_t begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(" \t\r\n") - begin + 1);
}

// Splits at every `sep`, trimming the parts; "a,,b" gives an empty middle part, "" gives one empty part.
inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t end = s.find(sep, start);
    parts.push_back(trim(s.substr(start, end == std::string::npos ? std::string::npos : end - start)));
    if (end == std::string::npos) return parts;
    start = end + 1;
  }
}

// The shortest decimal text that reads back as exactly `v` ("0.3", not "0.29999999999999999").
inline std::string format_number(double v) {
  char text[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(text, sizeof(text), "%.*g", precision, v);
    if (std::strtod(text, nullptr) == v) break;
  }
  return text;
}

// "<plugin>: argument '<arg>' = '<text>': <problem>"
inline std::invalid_argument bad_arg(const std::string& plugin, const std::string& arg, const std::string& text,
                                     const std::string& problem) {
  return std::invalid_argument(plugin + ": argument '" + arg + "' = '" + text + "': " + problem);
}

// The value of a required argument; its absence is an error naming it.
inline std::string required_arg(const sdk::Args& args, const std::string& key, const std::string& plugin) {
  const auto it = args.find(key);
  if (it == args.end() || trim(it->second).empty()) {
    throw std::invalid_argument(plugin + ": argument '" + key + "' is required");
  }
  return it->second;
}

// "prose=0.7,code=0.3" -> {{"prose", 0.7}, {"code", 0.3}}. `text_for_errors` is the whole argument value (for
// staged, the full schedule) so that a message shows where the bad part sits.
inline Weights parse_weights(const std::string& text, const std::string& plugin, const std::string& arg,
                             const std::string& text_for_errors) {
  Weights weights;
  double sum = 0.0;
  for (const auto& item : split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos)
      throw bad_arg(plugin, arg, text_for_errors, "expected name=weight, got '" + item + "'");
    const std::string name = trim(item.substr(0, eq));
    const std::string value = trim(item.substr(eq + 1));
    if (name.empty()) throw bad_arg(plugin, arg, text_for_errors, "a weight without a source name in '" + item + "'");
    for (const auto& [seen, w] : weights) {
      if (seen == name) throw bad_arg(plugin, arg, text_for_errors, "source '" + name + "' given twice");
    }
    char* end = nullptr;
    const double w = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || !std::isfinite(w) || w < 0) {
      throw bad_arg(plugin, arg, text_for_errors,
                    "weight of '" + name + "' must be a finite number >= 0, got '" + value + "'");
    }
    weights.emplace_back(name, w + 0.0);  // + 0.0: -0 becomes 0
    sum += w;
  }
  if (!(sum > 0)) throw bad_arg(plugin, arg, text_for_errors, "weights sum to 0");
  if (!std::isfinite(sum)) throw bad_arg(plugin, arg, text_for_errors, "weights sum to more than a double holds");
  return weights;
}

inline std::string format_weights(const Weights& weights) {
  std::string out;
  for (const auto& [name, w] : weights) out += (out.empty() ? "" : ",") + name + "=" + format_number(w);
  return out;
}

// Refuses a weight for a source the run does not have, naming it and the sources there are.
inline void require_known_sources(const Weights& weights, const std::vector<std::string>& sources,
                                  const std::string& plugin, const std::string& arg) {
  for (const auto& [name, w] : weights) {
    bool known = false;
    for (const auto& s : sources) known = known || s == name;
    if (known) continue;
    std::string list;
    for (const auto& s : sources) list += (list.empty() ? "" : ", ") + s;
    throw std::invalid_argument(plugin + ": argument '" + arg + "' names unknown source '" + name +
                                "' (sources of this run: " + (list.empty() ? "none" : list) + ")");
  }
}

// A step number: decimal digits only, as in data.schedule.
inline int64_t parse_step(const std::string& text, const std::string& plugin, const std::string& arg,
                          const std::string& text_for_errors) {
  const std::string s = trim(text);
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) {
    throw bad_arg(plugin, arg, text_for_errors, "expected a step (an integer >= 0), got '" + s + "'");
  }
  errno = 0;
  const long long v = std::strtoll(s.c_str(), nullptr, 10);
  if (errno == ERANGE) throw bad_arg(plugin, arg, text_for_errors, "step '" + s + "' is out of range");
  return v;
}

}  // namespace keel::plugins

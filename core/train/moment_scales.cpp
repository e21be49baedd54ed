// Why: see moment_scales.h.
#include "core/train/moment_scales.h"

#include <fnmatch.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#include "core/plugin_host/plugin_library.h"

namespace keel::train {
namespace {

std::string number(double v) {
  std::ostringstream out;
  out.precision(6);
  out << v;
  return out.str();
}

double parse_factor(const std::string& text, const std::string& entry, const char* which) {
  char* end = nullptr;
  const double v = text.empty() ? NAN : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v) || v < 0.0)
    throw std::invalid_argument("entry '" + entry + "': the " + which + " factor '" + text +
                                "' is not a finite number >= 0");
  return v;
}

bool matches(const std::string& glob, const std::string& name) { return ::fnmatch(glob.c_str(), name.c_str(), 0) == 0; }

}  // namespace

std::vector<MomentScale> parse_moment_scales(const std::string& text, const std::vector<std::string>& names) {
  std::vector<MomentScale> out;
  if (text.empty()) return out;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(';', begin);
    if (end == std::string::npos) end = text.size();
    const std::string entry = text.substr(begin, end - begin);
    begin = end + 1;
    const size_t second_colon = entry.rfind(':');
    const size_t first_colon =
        second_colon == std::string::npos || second_colon == 0 ? std::string::npos : entry.rfind(':', second_colon - 1);
    if (first_colon == std::string::npos || first_colon == 0)
      throw std::invalid_argument("entry '" + entry + "' is not GLOB:FIRST:SECOND");
    MomentScale s;
    s.glob = entry.substr(0, first_colon);
    if (s.glob.find(':') != std::string::npos)
      throw std::invalid_argument("entry '" + entry + "' is not GLOB:FIRST:SECOND (the glob holds a ':')");
    s.first = parse_factor(entry.substr(first_colon + 1, second_colon - first_colon - 1), entry, "first");
    s.second = parse_factor(entry.substr(second_colon + 1), entry, "second");
    if (!names.empty()) {
      bool any = false;
      for (const auto& n : names) any = any || matches(s.glob, n);
      if (!any)
        throw std::invalid_argument("glob '" + s.glob + "' matches no tensor of the model (e.g. " + names.front() +
                                    ")");
    }
    out.push_back(std::move(s));
  }
  return out;
}

const MomentScale* moment_scale_for(const std::vector<MomentScale>& scales, const std::string& name) {
  for (const auto& s : scales) {
    if (matches(s.glob, name)) return &s;
  }
  return nullptr;
}

MomentSurgery apply_moment_scales(sdk::Plugin& optimizer, const std::string& optimizer_name,
                                  const std::vector<MomentScale>& scales) {
  MomentSurgery done;
  sdk::PluginState state = optimizer.save_state();
  bool has_first = false, has_second = false;
  for (const auto& [name, tensor] : state.tensors) {
    const size_t slash = name.rfind('/');
    if (slash == std::string::npos) continue;
    const std::string kind = name.substr(slash + 1);
    has_first = has_first || kind == "exp_avg";
    has_second = has_second || kind == "exp_avg_sq";
  }
  bool wants_first = false, wants_second = false;
  for (const auto& s : scales) {
    wants_first = wants_first || s.first != 1.0;
    wants_second = wants_second || s.second != 1.0;
  }
  // A rank whose optimizer holds nothing (a ZeRO-1 share without tensors) has nothing to scale.
  if (!state.tensors.empty() && ((wants_first && !has_first) || (wants_second && !has_second))) {
    const char* kind = wants_first && !has_first ? "exp_avg" : "exp_avg_sq";
    throw std::runtime_error("optimizer " + optimizer_name + " has no '<param>/" + kind +
                             "' tensors in its state, so moment scales cannot change them");
  }
  for (auto& [name, tensor] : state.tensors) {
    const size_t slash = name.rfind('/');
    if (slash == std::string::npos) continue;
    const std::string kind = name.substr(slash + 1);
    if (kind != "exp_avg" && kind != "exp_avg_sq") continue;
    const MomentScale* s = moment_scale_for(scales, name.substr(0, slash));
    if (s == nullptr) continue;
    const double factor = kind == "exp_avg" ? s->first : s->second;
    if (factor == 1.0) continue;
    if (factor == 0.0)
      tensor.zero_();  // [param shape]; a reset, NaN included
    else
      tensor.mul_(factor);
    ++(kind == "exp_avg" ? done.first_tensors : done.second_tensors);
  }
  optimizer.load_state(state);  // a plugin whose save_state hands out copies gets them back
  return done;
}

void check_moment_scales(const std::string& text, const std::string& plugin, int64_t step,
                         const std::vector<std::string>& tensor_names) {
  if (text.empty()) return;
  try {
    parse_moment_scales(text, tensor_names);
  } catch (const std::exception& e) {
    throw plugin_host::PluginError("plugin " + plugin + " returned moment_scales '" + text +
                                   "' from decide() at step " + std::to_string(step) + ": " + e.what() +
                                   "; the run stops before the value reaches the optimizer");
  }
}

std::string apply_decision_moment_scales(TrainerState& s, const std::string& text, const std::string& decided_by) {
  torch::NoGradGuard no_grad;
  const std::vector<MomentScale> scales = parse_moment_scales(text, s.tensor_names);  // checked in decide()
  std::vector<int64_t> matched(scales.size(), 0);
  for (const auto& name : s.tensor_names) {
    const MomentScale* m = moment_scale_for(scales, name);
    if (m != nullptr) ++matched[static_cast<size_t>(m - scales.data())];
  }
  plugin_host::LoadedPlugin& optimizer = s.plugins->optimizer();
  try {
    apply_moment_scales(*optimizer.object, optimizer.name(), scales);
  } catch (const std::exception& e) {
    throw std::runtime_error("moment_scales '" + text + "' asked for by " + decided_by + ": " + e.what());
  }
  std::string line = "moment scales '" + text + "' (by " + decided_by + ") on optimizer " + optimizer.name() + ":";
  for (size_t i = 0; i < scales.size(); ++i) {
    line += (i == 0 ? " " : "; ") + scales[i].glob + " " + std::to_string(matched[i]) + " of " +
            std::to_string(s.tensor_names.size()) + " tensors, exp_avg x" + number(scales[i].first) + ", exp_avg_sq x" +
            number(scales[i].second);
  }
  return line;
}

}  // namespace keel::train

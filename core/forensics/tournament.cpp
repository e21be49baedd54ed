// Why: see tournament.h. The arms file is parsed here by hand (not by the config parser) so that every error
// names the file and line, and so that a shorthand's expansion is written down in one table.
#include "core/forensics/tournament.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <sstream>

namespace keel::forensics {
namespace {

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t\r") - a + 1);
}

std::vector<std::string> words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// The value as a finite number, or an error naming the key.
double number(const std::string& key, const std::string& value, const std::string& where) {
  try {
    size_t used = 0;
    const double v = std::stod(value, &used);
    if (used == value.size() && std::isfinite(v)) return v;
  } catch (const std::exception&) {
  }
  throw TournamentError(where + "'" + key + "' needs a number, got '" + value + "'");
}

bool boolean(const std::string& key, const std::string& value, const std::string& where) {
  if (value == "true" || value == "1") return true;
  if (value == "false" || value == "0") return false;
  throw TournamentError(where + "'" + key + "' needs true or false, got '" + value + "'");
}

const char* const kKnownKeys =
    "baseline, set, plugin, plugin_arg, skip_spikes, skip_spikes_threshold, lr_factor, lr_steps, eps, update_clip, "
    "reset_moments, scale_moments, moments_at, rollback, embedding_grad_shrink";

// What one arm's section has claimed so far: the spike_handler slot takes one plugin per arm.
struct SectionState {
  std::string spike_handler, claimed_by;  // the plugin, and the key that asked for it first
  int claimed_line = 0;
  std::map<std::string, int> seen;  // key -> its line, for keys that need another one
};

// Claims the spike_handler slot for `plugin`; true when this key is the first to ask for it (then the caller adds
// the --plugin), false when an earlier key of the arm already chose the same plugin.
bool claim_spike_handler(SectionState& s, const std::string& plugin, const std::string& key, int line,
                         const std::string& where) {
  if (s.spike_handler == plugin) return false;
  if (!s.spike_handler.empty())
    throw TournamentError(where + "'" + key + "' needs spike_handler = " + plugin + ", but '" + s.claimed_by +
                          "' (line " + std::to_string(s.claimed_line) + ") already chose " + s.spike_handler +
                          ": one spike handler per arm");
  s.spike_handler = plugin;
  s.claimed_by = key;
  s.claimed_line = line;
  return true;
}

void handler(SectionState& s, const std::string& plugin, const std::string& key, ArmEntry& e,
             const std::string& where) {
  if (claim_spike_handler(s, plugin, key, e.line, where)) e.plugins.push_back("spike_handler=" + plugin);
}

void require_pair(const std::string& key, const std::string& word, const std::string& where, char sep) {
  const size_t at = word.find(sep);
  if (at == std::string::npos || at == 0 || at + 1 == word.size())
    throw TournamentError(where + "'" + key + "' takes " +
                          (sep == '=' ? std::string("KEY=VALUE words") : std::string("NAME.KEY=VALUE words")) +
                          ", got '" + word + "'");
}

// Expands one "key = value" line of an arm into `e`.
void expand(const std::string& key, const std::string& value, ArmEntry& e, Arm& arm, SectionState& s,
            const std::string& where) {
  if (value.empty()) throw TournamentError(where + "'" + key + "' has no value");
  s.seen.emplace(key, e.line);
  if (key == "baseline") {
    arm.baseline = boolean(key, value, where);
  } else if (key == "set") {
    for (const auto& w : words(value)) {
      require_pair(key, w, where, '=');
      e.overrides.push_back(w);
    }
  } else if (key == "plugin") {
    for (const auto& w : words(value)) {
      require_pair(key, w, where, '=');
      if (w.rfind("spike_handler=", 0) == 0 && !claim_spike_handler(s, w.substr(14), key, e.line, where)) continue;
      e.plugins.push_back(w);
    }
  } else if (key == "plugin_arg") {
    for (const auto& w : words(value)) {
      require_pair(key, w, where, '=');
      if (w.find('.') == std::string::npos || w.find('.') > w.find('='))
        throw TournamentError(where + "'plugin_arg' takes NAME.KEY=VALUE words, got '" + w + "'");
      e.plugin_args.push_back(w);
    }
  } else if (key == "skip_spikes") {
    if (boolean(key, value, where)) handler(s, "zscore_skip", key, e, where);
  } else if (key == "skip_spikes_threshold") {
    const double z = number(key, value, where);
    if (z <= 0) throw TournamentError(where + "'skip_spikes_threshold' must be > 0, got " + value);
    e.plugin_args.push_back("zscore_skip.threshold=" + value);
  } else if (key == "lr_factor") {
    const double f = number(key, value, where);
    if (!(f > 0 && f <= 1)) throw TournamentError(where + "'lr_factor' must be in (0, 1], got " + value);
    handler(s, "lr_cooldown", key, e, where);
    e.plugin_args.push_back("lr_cooldown.lr_factor=" + value);
  } else if (key == "lr_steps") {
    const double k = number(key, value, where);
    if (k < 1 || k != std::floor(k)) throw TournamentError(where + "'lr_steps' must be an integer >= 1, got " + value);
    e.plugin_args.push_back("lr_cooldown.cooldown_steps=" + value);
  } else if (key == "eps") {
    if (number(key, value, where) <= 0) throw TournamentError(where + "'eps' must be > 0, got " + value);
    e.overrides.push_back("optim.eps=" + value);
  } else if (key == "update_clip") {
    if (number(key, value, where) <= 0) throw TournamentError(where + "'update_clip' must be > 0, got " + value);
    e.plugins.push_back("grad_transform=update_clip");
    e.plugin_args.push_back("update_clip.max_rms=" + value);
  } else if (key == "embedding_grad_shrink") {
    const double a = number(key, value, where);
    if (!(a > 0 && a <= 1)) throw TournamentError(where + "'embedding_grad_shrink' must be in (0, 1], got " + value);
    e.plugins.push_back("grad_transform=embedding_grad_shrink");
    e.plugin_args.push_back("embedding_grad_shrink.alpha=" + value);
  } else if (key == "rollback") {
    if (boolean(key, value, where)) handler(s, "rollback_skip", key, e, where);
  } else if (key == "reset_moments" || key == "scale_moments") {
    // moment_surgery asks Keel for Decision::moment_scales: reset_moments = GLOB[,GLOB] zeroes both moments of the
    // matching tensors, scale_moments = GLOB[,GLOB]:FIRST:SECOND multiplies them.
    std::string pattern = value, first = "0", second = "0";
    if (key == "scale_moments") {
      const size_t b = value.rfind(':'), a = b == std::string::npos || b == 0 ? b : value.rfind(':', b - 1);
      if (a == std::string::npos || a == 0)
        throw TournamentError(where + "'scale_moments' takes GLOB:FIRST:SECOND, got '" + value + "'");
      pattern = value.substr(0, a);
      first = value.substr(a + 1, b - a - 1);
      second = value.substr(b + 1);
      if (number(key, first, where) < 0 || number(key, second, where) < 0)
        throw TournamentError(where + "'scale_moments' factors must be >= 0, got '" + value + "'");
    }
    if (words(pattern).size() != 1 || pattern.find(':') != std::string::npos)
      throw TournamentError(where + "'" + key + "' needs one GLOB[,GLOB] without spaces, got '" + pattern + "'");
    handler(s, "moment_surgery", key, e, where);
    e.plugin_args.insert(e.plugin_args.end(), {"moment_surgery.pattern=" + pattern, "moment_surgery.first=" + first,
                                               "moment_surgery.second=" + second});
  } else if (key == "moments_at") {
    if (value != "resume" && value != "spike")
      throw TournamentError(where + "'moments_at' is resume or spike, got '" + value + "'");
    e.plugin_args.push_back("moment_surgery.at=" + value);
  } else {
    throw TournamentError(where + "unknown key '" + key + "' (known: " + kKnownKeys + ")");
  }
}

}  // namespace

std::vector<std::string> Arm::overrides() const {
  std::vector<std::string> out;
  for (const auto& e : entries) out.insert(out.end(), e.overrides.begin(), e.overrides.end());
  return out;
}
std::vector<std::string> Arm::plugins() const {
  std::vector<std::string> out;
  for (const auto& e : entries) out.insert(out.end(), e.plugins.begin(), e.plugins.end());
  return out;
}
std::vector<std::string> Arm::plugin_args() const {
  std::vector<std::string> out;
  for (const auto& e : entries) out.insert(out.end(), e.plugin_args.begin(), e.plugin_args.end());
  return out;
}

namespace {

// A key that only refines another one needs it in the same arm.
void check_section(const Arm& arm, const SectionState& s, const std::string& path) {
  for (const auto& [key, needs] : std::vector<std::pair<std::string, std::string>>{
           {"lr_steps", "lr_factor"}, {"skip_spikes_threshold", "skip_spikes"}, {"moments_at", "reset_moments"}}) {
    const auto it = s.seen.find(key);
    const bool moments = needs == "reset_moments" && s.seen.count("scale_moments");
    if (it != s.seen.end() && !s.seen.count(needs) && !moments)
      throw TournamentError(path + ":" + std::to_string(it->second) + ": [arm." + arm.name + "]: '" + key +
                            "' needs '" + needs + "' in the same arm");
  }
}

}  // namespace

std::vector<Arm> parse_arms(const std::string& text, const std::string& path) {
  static const std::regex kSection(R"(^\[([^\]]*)\]$)");
  static const std::regex kArmName(R"(^arm\.([A-Za-z0-9_]+)$)");
  std::vector<Arm> arms;
  std::vector<SectionState> states;
  std::istringstream in(text);
  int line_no = 0;
  for (std::string raw; std::getline(in, raw);) {
    ++line_no;
    const std::string at = path + ":" + std::to_string(line_no) + ": ";
    std::string line = raw;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line = line.substr(0, hash);
    line = trim(line);
    if (line.empty() || line[0] == ';') continue;
    std::smatch m;
    if (line[0] == '[') {
      if (!std::regex_match(line, m, kSection)) throw TournamentError(at + "malformed section header '" + line + "'");
      const std::string section = trim(m[1].str());
      std::smatch name;
      if (!std::regex_match(section, name, kArmName))
        throw TournamentError(at + "section [" + section +
                              "]: expected [arm.NAME] (NAME of letters, digits and _; it names the arm's run dir)");
      for (const auto& a : arms)
        if (a.name == name[1].str())
          throw TournamentError(at + "arm '" + a.name + "' again (first at line " + std::to_string(a.line) + ")");
      if (!arms.empty()) check_section(arms.back(), states.back(), path);
      arms.push_back(Arm{name[1].str(), line_no, false, {}});
      states.emplace_back();
      continue;
    }
    if (arms.empty()) throw TournamentError(at + "'" + line + "' before any [arm.NAME] section");
    const size_t eq = line.find('=');
    if (eq == std::string::npos) throw TournamentError(at + "expected 'key = value', got '" + line + "'");
    const std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    ArmEntry e;
    e.line = line_no;
    e.text = key + " = " + value;
    expand(key, value, e, arms.back(), states.back(), at + "[arm." + arms.back().name + "]: ");
    if (!e.overrides.empty() || !e.plugins.empty() || !e.plugin_args.empty()) arms.back().entries.push_back(e);
  }
  if (!arms.empty()) check_section(arms.back(), states.back(), path);
  if (arms.size() < 2)
    throw TournamentError(path + ": " + std::to_string(arms.size()) +
                          " arm(s); a tournament needs at least two [arm.NAME] sections (one the baseline)");
  std::vector<const Arm*> marked;
  for (const auto& a : arms)
    if (a.baseline) marked.push_back(&a);
  if (marked.size() > 1)
    throw TournamentError(path + ":" + std::to_string(marked[1]->line) + ": [arm." + marked[1]->name +
                          "]: a second 'baseline = true' (arm '" + marked[0]->name + "' is the baseline)");
  if (marked.empty()) {
    auto it = std::find_if(arms.begin(), arms.end(), [](const Arm& a) { return a.name == "baseline"; });
    if (it == arms.end())
      throw TournamentError(path + ": no baseline arm: name one [arm.baseline] or give one arm 'baseline = true'");
    it->baseline = true;
  }
  return arms;
}

std::vector<Arm> read_arms(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw TournamentError("cannot read the arms file " + path);
  std::stringstream text;
  text << in.rdbuf();
  return parse_arms(text.str(), path);
}

size_t baseline_index(const std::vector<Arm>& arms) {
  for (size_t i = 0; i < arms.size(); ++i)
    if (arms[i].baseline) return i;
  throw TournamentError("no baseline arm");
}

std::vector<SourceCursor> ledger_cursors(const std::string& data_ledger_json) {
  std::vector<SourceCursor> out;
  try {
    const nlohmann::json j = nlohmann::json::parse(data_ledger_json);
    for (const auto& s : j.at("sources"))
      out.push_back(
          {s.at("name").get<std::string>(), s.at("position").get<int64_t>(), s.at("samples_per_epoch").get<int64_t>()});
  } catch (const nlohmann::json::exception& e) {
    throw TournamentError(std::string("the checkpoint's data ledger has no readable source cursors: ") + e.what());
  }
  return out;
}

std::string replicate_skip_rules(const std::vector<SourceCursor>& cursors, int64_t chunks, int64_t replicate,
                                 int64_t replicates) {
  if (replicates > chunks)
    throw TournamentError("--seeds " + std::to_string(replicates) + " is more than data.chunks = " +
                          std::to_string(chunks) + ": each replicate starts a whole chunk further along");
  if (replicate == 0) return "";
  const int64_t ahead = replicate * chunks / replicates;  // chunks passed over, in [1, chunks)
  std::string rules;
  auto add = [&rules](const std::string& source, int64_t a, int64_t b) {
    rules +=
        (rules.empty() ? "" : ";") + source + ":chunk:" + std::to_string(a) + (a == b ? "" : "-" + std::to_string(b));
  };
  for (const auto& c : cursors) {
    if (c.samples_per_epoch <= 0) continue;
    const int64_t first = std::min(chunks - 1, c.position * chunks / c.samples_per_epoch);
    const int64_t last = first + ahead - 1;
    if (last < chunks) {
      add(c.name, first, last);
    } else {  // wraps at the epoch's end
      add(c.name, first, chunks - 1);
      add(c.name, 0, last - chunks);
    }
  }
  return rules;
}

PairedDiff paired_bootstrap(const std::vector<double>& a, const std::vector<double>& b, int64_t resamples,
                            uint64_t seed) {
  if (a.size() != b.size() || a.empty())
    throw TournamentError("paired test: " + std::to_string(a.size()) + " and " + std::to_string(b.size()) +
                          " units (need the same number, at least one)");
  const size_t n = a.size();
  std::vector<double> d(n);
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += (d[i] = a[i] - b[i]);
  PairedDiff out;
  out.mean = sum / static_cast<double>(n);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  std::vector<double> means(static_cast<size_t>(std::max<int64_t>(resamples, 1)));
  for (auto& m : means) {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += d[pick(rng)];
    m = s / static_cast<double>(n);
  }
  std::sort(means.begin(), means.end());
  auto quantile = [&means](double q) {
    const double pos = q * static_cast<double>(means.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, means.size() - 1);
    return means[lo] + (pos - static_cast<double>(lo)) * (means[hi] - means[lo]);
  };
  out.lo = quantile(0.025);
  out.hi = quantile(0.975);
  return out;
}

TournamentVerdict decide(const std::vector<ArmScores>& arms, size_t baseline, int64_t resamples, uint64_t seed) {
  if (arms.size() < 2) throw TournamentError("a tournament needs at least two arms");
  TournamentVerdict v;
  for (const auto& a : arms) {
    double s = 0;
    for (double x : a.units) s += x;
    v.mean.push_back(a.units.empty() ? NAN : s / static_cast<double>(a.units.size()));
    v.vs_baseline.push_back(paired_bootstrap(a.units, arms[baseline].units, resamples, seed));
  }
  std::vector<size_t> order(arms.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&v](size_t x, size_t y) { return v.mean[x] < v.mean[y]; });
  v.best = order[0];
  v.runner_up = order[1];
  v.best_vs_runner_up = paired_bootstrap(arms[v.best].units, arms[v.runner_up].units, resamples, seed);
  v.clear = v.best_vs_runner_up.hi < 0;
  return v;
}

std::string format_table(const nlohmann::json& r) {
  auto num = [](double x, const char* fmt) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), fmt, x);
    return std::string(buf);
  };
  std::ostringstream out;
  out << "keel tournament: " << r.at("arms").size() << " arms x " << r.at("seeds").get<int64_t>()
      << " replicate(s) from " << r.at("checkpoint").get<std::string>() << " (step " << r.at("from_step").get<int64_t>()
      << "), " << r.at("steps").get<int64_t>() << " steps each\n"
      << "measure: " << r.at("measure").get<std::string>() << "\n"
      << "test: " << r.at("test").get<std::string>() << "\n\n";
  char head[160];
  std::snprintf(head, sizeof(head), "%-24s %10s %12s  %-22s  %s\n", "arm", "mean NLL", "vs baseline", "95% CI",
                "changes");
  out << head;
  for (const auto& a : r.at("arms")) {
    const auto& d = a.at("vs_baseline");
    std::string changes;
    for (const auto& c : a.at("changes")) changes += (changes.empty() ? "" : "; ") + c.get<std::string>();
    if (a.at("baseline").get<bool>()) changes = "(baseline)" + (changes.empty() ? "" : " " + changes);
    char row[512];
    std::snprintf(row, sizeof(row), "%-24s %10s %12s  %-22s  %s\n", a.at("name").get<std::string>().c_str(),
                  num(a.at("mean_nll").get<double>(), "%.4f").c_str(),
                  a.at("baseline").get<bool>() ? "" : num(d.at("mean_diff").get<double>(), "%+.4f").c_str(),
                  a.at("baseline").get<bool>() ? ""
                                               : ("[" + num(d.at("ci95")[0].get<double>(), "%+.4f") + ", " +
                                                  num(d.at("ci95")[1].get<double>(), "%+.4f") + "]")
                                                     .c_str(),
                  changes.c_str());
    out << row;
  }
  const auto& w = r.at("winner_vs_runner_up");
  out << "\n" << r.at("verdict").get<std::string>() << "\n";
  out << "best " << w.at("best").get<std::string>() << " - runner-up " << w.at("runner_up").get<std::string>() << ": "
      << num(w.at("mean_diff").get<double>(), "%+.4f") << " [" << num(w.at("ci95")[0].get<double>(), "%+.4f") << ", "
      << num(w.at("ci95")[1].get<double>(), "%+.4f") << "]\n";
  return out.str();
}

}  // namespace keel::forensics

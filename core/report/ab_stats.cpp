// Why: see ab_stats.h. Student's t quantile comes from Boost.Math (header-only, already a Keel dependency via
// Boost), so the intervals are exact for any n rather than read from a short table.
#include "core/report/ab_stats.h"

#include <algorithm>
#include <boost/math/distributions/students_t.hpp>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>
#include <tuple>

namespace keel::report {

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
}  // namespace

Summary summarize(const std::vector<double>& values) {
  Summary s;
  s.n = static_cast<int64_t>(values.size());
  if (values.empty()) {
    s.mean = s.sd = kNaN;
    return s;
  }
  double sum = 0.0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(s.n);
  if (s.n < 2) {
    s.sd = kNaN;
    return s;
  }
  double squares = 0.0;
  for (double v : values) squares += (v - s.mean) * (v - s.mean);
  s.sd = std::sqrt(squares / static_cast<double>(s.n - 1));
  return s;
}

double t_quantile_975(double df) {
  if (!(df > 0.0) || !std::isfinite(df)) return kNaN;
  return boost::math::quantile(boost::math::students_t_distribution<double>(df), 0.975);
}

Difference paired_difference(const std::vector<double>& arm, const std::vector<double>& baseline) {
  if (arm.size() != baseline.size()) {
    throw std::invalid_argument("paired difference: " + std::to_string(arm.size()) + " arm values, " +
                                std::to_string(baseline.size()) + " baseline values");
  }
  std::vector<double> d(arm.size());
  for (size_t i = 0; i < arm.size(); ++i) d[i] = arm[i] - baseline[i];
  const Summary s = summarize(d);
  Difference out;
  out.paired = true;
  out.n = s.n;
  out.mean = s.mean;
  out.sd = s.sd;
  out.df = s.n >= 2 ? static_cast<double>(s.n - 1) : kNaN;
  out.t = t_quantile_975(out.df);
  const double half = out.t * s.sd / std::sqrt(static_cast<double>(s.n));
  out.ci_low = s.n >= 2 ? s.mean - half : kNaN;
  out.ci_high = s.n >= 2 ? s.mean + half : kNaN;
  return out;
}

Difference welch_difference(const std::vector<double>& arm, const std::vector<double>& baseline) {
  const Summary a = summarize(arm), b = summarize(baseline);
  Difference out;
  out.paired = false;
  out.n = std::min(a.n, b.n);
  out.mean = a.mean - b.mean;
  out.sd = kNaN;
  out.ci_low = out.ci_high = kNaN;
  out.df = out.t = kNaN;
  if (a.n >= 2 && b.n >= 2) {
    const double va = a.sd * a.sd / static_cast<double>(a.n), vb = b.sd * b.sd / static_cast<double>(b.n);
    const double se = std::sqrt(va + vb);
    if (se == 0.0) {
      out.ci_low = out.ci_high = out.mean;
    } else {
      // Welch–Satterthwaite degrees of freedom.
      const double df =
          (va + vb) * (va + vb) / (va * va / static_cast<double>(a.n - 1) + vb * vb / static_cast<double>(b.n - 1));
      out.df = df;
      out.t = t_quantile_975(df);
      const double half = out.t * se;
      out.ci_low = out.mean - half;
      out.ci_high = out.mean + half;
    }
  }
  return out;
}

std::string MetricKey::label() const {
  if (kind == "final_train_loss") return "train loss (mean of last 10% of steps)";
  const std::string what = kind == "eval_loss" ? "eval loss" : "eval perplexity";
  return what + " · " + source + " @ step " + std::to_string(eval_step);
}

bool MetricKey::operator<(const MetricKey& o) const {
  // Train loss first, then per eval step, per source: loss before perplexity.
  const auto rank = [](const MetricKey& k) { return k.kind == "final_train_loss" ? 0 : 1; };
  return std::make_tuple(rank(*this), eval_step, source, kind) <
         std::make_tuple(rank(o), o.eval_step, o.source, o.kind);
}

std::map<MetricKey, double> run_metrics(const RunData& run) {
  std::map<MetricKey, double> out;
  const double loss = final_train_loss(run.rows);
  if (std::isfinite(loss)) out[{"final_train_loss", -1, ""}] = loss;
  for (const auto& e : run.evals) {
    for (const auto& s : e.sources) {
      out[{"eval_loss", e.step, s.source}] = s.nll;
      out[{"eval_perplexity", e.step, s.source}] = s.perplexity;
    }
  }
  return out;
}

AbTable build_ab_table(const std::vector<RunData>& runs, const std::string& baseline) {
  AbTable table;
  // Arms in the order first given, with their runs.
  std::map<std::string, std::vector<const RunData*>> runs_of_arm;
  for (const auto& run : runs) {
    if (!runs_of_arm.count(run.arm.arm)) table.arms.push_back(run.arm.arm);
    runs_of_arm[run.arm.arm].push_back(&run);
  }
  if (table.arms.empty()) return table;
  table.baseline = baseline.empty() ? table.arms.front() : baseline;
  if (!runs_of_arm.count(table.baseline)) {
    std::string known;
    for (const auto& a : table.arms) known += (known.empty() ? "" : ", ") + a;
    throw std::invalid_argument("--baseline " + baseline + ": no such arm (arms: " + known + ")");
  }
  if (runs.size() < 2)
    table.notes.push_back("one run only: there is nothing to compare it with");
  else if (table.arms.size() < 2)
    table.notes.push_back("all runs are seeds of one arm (" + table.arms.front() +
                          "): the table shows the seed spread, no differences");
  bool any_eval = false;
  for (const auto& run : runs) any_eval = any_eval || !run.evals.empty();
  if (!any_eval) {
    table.notes.push_back(
        "no eval files (RUN_DIR/eval/step-N.h5): run `keel eval RUN_DIR` for validation loss and "
        "perplexity; the table shows the train loss only");
  }

  // Per arm: the metrics present in every run of the arm, with one value per run.
  std::map<std::string, std::map<MetricKey, ArmMetric>> per_arm;
  for (const auto& arm : table.arms) {
    const auto& members = runs_of_arm.at(arm);
    std::vector<std::map<MetricKey, double>> values;
    for (const RunData* run : members) values.push_back(run_metrics(*run));
    for (const auto& [key, first_value] : values.front()) {
      const bool in_all = std::all_of(values.begin(), values.end(), [&](const auto& m) { return m.count(key) > 0; });
      if (!in_all) continue;
      ArmMetric m;
      m.arm = arm;
      m.metric = key;
      for (size_t i = 0; i < members.size(); ++i) {
        m.seeds.push_back(members[i]->arm.seed);
        m.runs.push_back(members[i]->name);
        m.values.push_back(values[i].at(key));
      }
      m.summary = summarize(m.values);
      per_arm[arm][key] = std::move(m);
    }
  }

  // Differences to the baseline, paired by seed index where both arms have it.
  const auto& base_metrics = per_arm[table.baseline];
  for (auto& [arm, metrics] : per_arm) {
    if (arm == table.baseline) continue;
    for (auto& [key, m] : metrics) {
      const auto base = base_metrics.find(key);
      if (base == base_metrics.end()) continue;
      std::vector<double> paired_arm, paired_base;
      std::vector<int64_t> paired_seeds;
      for (size_t i = 0; i < m.seeds.size(); ++i) {
        if (m.seeds[i] < 0) continue;
        const auto& bs = base->second.seeds;
        const auto j = std::find(bs.begin(), bs.end(), m.seeds[i]);
        if (j == bs.end()) continue;
        paired_arm.push_back(m.values[i]);
        paired_seeds.push_back(m.seeds[i]);
        paired_base.push_back(base->second.values[static_cast<size_t>(j - bs.begin())]);
      }
      m.difference = paired_arm.empty() ? welch_difference(m.values, base->second.values)
                                        : paired_difference(paired_arm, paired_base);
      if (m.difference.paired) {
        m.difference.pair_seeds = paired_seeds;
        for (size_t i = 0; i < paired_arm.size(); ++i)
          m.difference.pair_values.push_back(paired_arm[i] - paired_base[i]);
      }
      m.has_difference = true;
    }
  }

  // Rows: by metric, then arms in the order given.
  std::set<MetricKey> keys;
  for (const auto& [arm, metrics] : per_arm) {
    for (const auto& [key, m] : metrics) keys.insert(key);
  }
  for (const auto& key : keys) {
    for (const auto& arm : table.arms) {
      const auto it = per_arm[arm].find(key);
      if (it != per_arm[arm].end()) table.rows.push_back(it->second);
    }
  }
  return table;
}

namespace {
nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }
}  // namespace

nlohmann::json ab_table_json(const AbTable& t) {
  nlohmann::json j{{"baseline", t.baseline},
                   {"arms", t.arms},
                   {"confidence", 0.95},
                   {"notes", t.notes},
                   {"rows", nlohmann::json::array()}};
  for (const auto& r : t.rows) {
    nlohmann::json values = nlohmann::json::array();
    for (double v : r.values) values.push_back(number(v));
    nlohmann::json row{{"arm", r.arm},
                       {"metric",
                        {{"kind", r.metric.kind},
                         {"eval_step", r.metric.eval_step},
                         {"source", r.metric.source},
                         {"label", r.metric.label()}}},
                       {"seeds", r.seeds},
                       {"runs", r.runs},
                       {"values", values},
                       {"n", r.summary.n},
                       {"mean", number(r.summary.mean)},
                       {"sd", number(r.summary.sd)},
                       {"difference", nullptr}};
    if (r.has_difference) {
      const Difference& d = r.difference;
      nlohmann::json pairs = nlohmann::json::array();
      for (size_t i = 0; i < d.pair_seeds.size() && i < d.pair_values.size(); ++i)
        pairs.push_back({{"seed", d.pair_seeds[i]}, {"value", number(d.pair_values[i])}});
      row["difference"] = {{"test", d.test()},         {"paired", d.paired},         {"n", d.n},
                           {"mean", number(d.mean)},   {"sd", number(d.sd)},         {"df", number(d.df)},
                           {"t", number(d.t)},         {"ci_low", number(d.ci_low)}, {"ci_high", number(d.ci_high)},
                           {"pairs", std::move(pairs)}};
    }
    j["rows"].push_back(std::move(row));
  }
  return j;
}

}  // namespace keel::report

// Why: the A/B table of `keel report` answers "did arm X change the result, by more than seed noise?". Runs are
// grouped into arms by name (parse_arm_name: `base-seed1`, `base-seed2` are two seeds of arm `base`); per arm
// and metric the table gives mean ± sd over seeds, and per non-baseline arm the difference to the baseline,
// paired by seed index where both arms have the same `-seed<N>` (the seed cancels, so the paired sd is what
// the arm itself changes), with a 95% confidence interval from the t distribution. Without common seed
// indices the difference of the means is given with Welch's interval. The statistics are separated from the
// reading (run_data.h) so that they are tested on hand-made numbers.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/report/run_data.h"

namespace keel::report {

// Mean and sample standard deviation (n - 1); sd is NaN for n < 2, mean NaN for n = 0.
struct Summary {
  int64_t n = 0;
  double mean = 0.0;
  double sd = 0.0;
};
Summary summarize(const std::vector<double>& values);

// The 0.975 quantile of Student's t with `df` degrees of freedom (df may be fractional, Welch); NaN for df <= 0.
double t_quantile_975(double df);

// A difference arm - baseline with its 95% confidence interval (NaN bounds where n is too small for one).
struct Difference {
  bool paired = false;
  int64_t n = 0;        // pairs (paired) or min(n_arm, n_baseline)
  double mean = 0.0;    // mean of the paired differences, or difference of the means
  double sd = 0.0;      // sd of the paired differences (NaN for n < 2 or unpaired)
  double ci_low = 0.0;  // 95% CI
  double ci_high = 0.0;
  double df = 0.0;  // degrees of freedom of the t quantile (n - 1, or Welch-Satterthwaite); NaN without one
  double t = 0.0;   // that quantile, t(0.975, df); the interval is mean ± t * standard error
  // Paired only (filled by build_ab_table): the seed index and the difference arm - baseline of every pair.
  std::vector<int64_t> pair_seeds;
  std::vector<double> pair_values;
  // "paired_t" (Student's t on the paired differences) or "welch_t" (Welch's t on two independent samples).
  std::string test() const { return paired ? "paired_t" : "welch_t"; }
};
// Paired: mean ± t(0.975, n-1) * sd / sqrt(n) of arm[i] - baseline[i]. Throws std::invalid_argument if the
// vectors differ in length.
Difference paired_difference(const std::vector<double>& arm, const std::vector<double>& baseline);
// Unpaired: mean(arm) - mean(baseline) with Welch's interval (both n >= 2; else NaN bounds).
Difference welch_difference(const std::vector<double>& arm, const std::vector<double>& baseline);

// What one row of the A/B table measures.
struct MetricKey {
  std::string kind;        // "final_train_loss", "eval_loss" or "eval_perplexity"
  int64_t eval_step = -1;  // the checkpoint step of an eval metric
  std::string source;      // the data source of an eval metric
  std::string label() const;
  bool operator<(const MetricKey& o) const;
};

// One metric of one arm.
struct ArmMetric {
  std::string arm;
  MetricKey metric;
  std::vector<int64_t> seeds;  // seed index of each value (-1: run without a seed suffix)
  std::vector<std::string> runs;
  std::vector<double> values;
  Summary summary;
  bool has_difference = false;  // false for the baseline and where the baseline lacks the metric
  Difference difference;
};

struct AbTable {
  std::string baseline;
  std::vector<std::string> arms;   // in the order first given
  std::vector<ArmMetric> rows;     // grouped by metric (in MetricKey order), then by arm
  std::vector<std::string> notes;  // why something is missing (one run, no eval files, ...)
};

// The metric values of one run: final train loss and, per eval file, per-source loss (NLL) and perplexity.
std::map<MetricKey, double> run_metrics(const RunData& run);

// Builds the table. `baseline` empty = the first arm given; an unknown baseline throws std::invalid_argument
// listing the arms. Eval metrics of an arm are those present in every run of the arm.
AbTable build_ab_table(const std::vector<RunData>& runs, const std::string& baseline);

// The table as JSON, the one form scripts read (`keel report --json`, docs/report.md): {baseline, arms,
// confidence, notes, rows: [{arm, metric, seeds, runs, values, n, mean, sd, difference}]}, where difference is
// null for the baseline's rows or {test, paired, n, mean, sd, df, t, ci_low, ci_high, pairs: [{seed, value}]}.
// NaN and infinities become null.
nlohmann::json ab_table_json(const AbTable& table);

}  // namespace keel::report

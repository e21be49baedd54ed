// Why: `keel report` (docs/report.md) turns several run dirs into one page. This part only gathers: it reads
// each run's metrics.h5 (the /train series, /events, the per-tensor grad norms), lineage.json and the
// eval/step-N.h5 files of `keel eval`, and puts them into plain structs that the A/B statistics
// (ab_stats.h) and the page (report_page.h) consume. It decides nothing about presentation except two
// things a page cannot do cheaply: which row of a re-run step counts (the last one, as docs/metrics.md says)
// and how a long run's per-tensor matrix is bucketed into at most `max_heatmap_columns` step columns.
// Torch-free: the metrics reader and the HDF5 reader of core/checkpoint are plain C++.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint/lineage.h"
#include "core/metrics/metrics_reader.h"
#include "core/report/precursors.h"

namespace keel::report {

// The arm/seed naming rule: a run dir's basename with a trailing `-seed<N>` or `-s<N>` removed is its arm,
// N is its seed index; without such a suffix the whole basename is the arm and seed is -1.
struct ArmName {
  std::string arm;
  int64_t seed = -1;
};
ArmName parse_arm_name(const std::string& run_dir);

// One optimizer step as the /train series record it (NaN where a value is not finite or missing).
struct TrainRow {
  int64_t step = 0;
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  double tokens_per_s = 0.0;
  bool skipped = false;
};

// Per-tensor gradient norms bucketed along the steps: cells[t][c] is log10 of the largest finite norm of
// tensor t in column c (spikes stay visible when many steps share a column), NaN when none was measured.
struct TensorHeatmap {
  std::vector<std::string> tensor_names;             // T
  std::vector<int64_t> column_first_step;            // C: first step of each column
  std::vector<int64_t> column_last_step;             // C: last step of each column
  std::vector<std::vector<double>> log10_grad_norm;  // [T][C]
  bool empty() const { return tensor_names.empty() || column_first_step.empty(); }
};

// One source of one eval file.
struct EvalSource {
  std::string source;
  double nll = 0.0;
  double perplexity = 0.0;
  int64_t tokens = 0;
  int64_t seen_in_training = 0;
};

// One RUN_DIR/eval/step-N.h5.
struct EvalResult {
  int64_t step = 0;
  std::string file;
  std::vector<EvalSource> sources;
};

// RUN_DIR/eval/curve.h5 of `keel eval --all` (docs/eval.md): one result per checkpoint step, `file` = the curve.
// Throws std::runtime_error naming the path when it is not a readable curve.
std::vector<EvalResult> read_eval_curve(const std::string& path);

struct RunData {
  std::string dir;   // as given
  std::string name;  // basename
  ArmName arm;
  std::vector<TrainRow> rows;        // the row that counts per step, steps ascending
  std::vector<TrainRow> superseded;  // earlier rows of steps that were re-run (a rollback's discarded rows)
  std::vector<metrics::Event> events;
  TensorHeatmap heatmap;
  // /train/source_loss (docs/metrics.md): the mean loss per source of each kept row's batch, [rows][sources],
  // NaN where a source had no sample in the step; empty when the run logged none.
  std::vector<std::string> source_names;
  std::vector<std::vector<double>> source_loss;
  std::optional<checkpoint::Lineage> lineage;               // absent if the run dir has no lineage.json
  std::vector<EvalResult> evals;                            // steps ascending
  std::vector<std::pair<std::string, std::string>> config;  // /config attributes of metrics.h5
  PrecursorStats precursors;  // /stats/ (metrics.stats_every); empty when the run logged none
};

struct GatherOptions {
  int64_t max_heatmap_columns = 300;
};

// Splits rows into the last row per step (ascending) and the rows replaced by a later row of the same step.
void split_superseded(const std::vector<TrainRow>& all, std::vector<TrainRow>& kept, std::vector<TrainRow>& superseded,
                      std::vector<size_t>* kept_indices = nullptr);

// Buckets `matrix` (rows = `row_indices` into it, one per kept step, `steps` their steps) into at most
// `max_columns` columns of consecutive steps. Throws std::invalid_argument if sizes disagree or max_columns < 1.
TensorHeatmap bucket_heatmap(const metrics::Matrix& matrix, const std::vector<std::string>& names,
                             const std::vector<size_t>& row_indices, const std::vector<int64_t>& steps,
                             int64_t max_columns);

// Reads one eval file of `keel eval` (docs/eval.md). Throws std::runtime_error naming the file.
EvalResult read_eval_file(const std::string& path);

// Everything the report shows of one run. Throws std::runtime_error naming the path when the run dir or its
// metrics.h5 is missing or unreadable, or when lineage.json or an eval file is malformed.
RunData gather_run(const std::string& run_dir, const GatherOptions& options = {});

// Mean of the finite losses of the last 10% of steps (at least one step); NaN if there is none.
double final_train_loss(const std::vector<TrainRow>& rows);

}  // namespace keel::report

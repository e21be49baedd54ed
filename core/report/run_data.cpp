// Why: see run_data.h. Reading is strict where a wrong number would mislead (a missing metrics.h5, a malformed
// lineage.json or eval file is an error naming the path) and lenient where the run simply has less to show (no
// per-tensor columns, no lineage.json from an old run, no eval/ folder).
#include "core/report/run_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <stdexcept>

#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"

namespace keel::report {

namespace fs = std::filesystem;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double finite_or_nan(double v) { return std::isfinite(v) ? v : kNaN; }

// The i-th value of a series, NaN past its end (a column one flush shorter after a crash, docs/metrics.md).
double at_or_nan(const std::vector<double>& v, size_t i) { return i < v.size() ? finite_or_nan(v[i]) : kNaN; }

std::string basename_of(const std::string& run_dir) {
  fs::path p(run_dir);
  while (!p.empty() && p.filename().empty()) p = p.parent_path();  // "runs/a/" -> "runs/a"
  return p.filename().string();
}

template <typename T>
std::vector<T> raw_values(const checkpoint::RawTensor& t, checkpoint::DType expected, const std::string& where) {
  if (t.dtype != expected) {
    throw std::runtime_error(where + ": expected " + checkpoint::dtype_name(expected) + ", found " +
                             checkpoint::dtype_name(t.dtype));
  }
  std::vector<T> out(t.bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), t.bytes.data(), out.size() * sizeof(T));
  return out;
}

}  // namespace

ArmName parse_arm_name(const std::string& run_dir) {
  static const std::regex kSeedSuffix(R"(^(.+)-(?:seed|s)([0-9]+)$)");
  ArmName out;
  const std::string base = basename_of(run_dir);
  std::smatch m;
  if (std::regex_match(base, m, kSeedSuffix) && m[2].length() <= 9) {
    out.arm = m[1].str();
    out.seed = std::stoll(m[2].str());
  } else {
    out.arm = base;
  }
  return out;
}

void split_superseded(const std::vector<TrainRow>& all, std::vector<TrainRow>& kept, std::vector<TrainRow>& superseded,
                      std::vector<size_t>* kept_indices) {
  std::map<int64_t, size_t> last_row_of_step;
  for (size_t i = 0; i < all.size(); ++i) last_row_of_step[all[i].step] = i;
  kept.clear();
  superseded.clear();
  if (kept_indices) kept_indices->clear();
  for (const auto& [step, row] : last_row_of_step) {
    kept.push_back(all[row]);
    if (kept_indices) kept_indices->push_back(row);
  }
  for (size_t i = 0; i < all.size(); ++i) {
    if (last_row_of_step.at(all[i].step) != i) superseded.push_back(all[i]);
  }
}

TensorHeatmap bucket_heatmap(const metrics::Matrix& matrix, const std::vector<std::string>& names,
                             const std::vector<size_t>& row_indices, const std::vector<int64_t>& steps,
                             int64_t max_columns) {
  if (max_columns < 1) throw std::invalid_argument("heatmap: max_columns must be >= 1");
  if (row_indices.size() != steps.size()) throw std::invalid_argument("heatmap: one step per row index expected");
  if (static_cast<int64_t>(names.size()) != matrix.cols) {
    throw std::invalid_argument("heatmap: " + std::to_string(names.size()) + " tensor names for " +
                                std::to_string(matrix.cols) + " columns");
  }
  TensorHeatmap out;
  out.tensor_names = names;
  const int64_t n = static_cast<int64_t>(row_indices.size());
  const int64_t columns = std::min<int64_t>(n, max_columns);
  out.log10_grad_norm.assign(names.size(), std::vector<double>(static_cast<size_t>(columns), kNaN));
  for (int64_t c = 0; c < columns; ++c) {
    const int64_t begin = c * n / columns, end = (c + 1) * n / columns;  // rows [begin, end) of this column
    out.column_first_step.push_back(steps[static_cast<size_t>(begin)]);
    out.column_last_step.push_back(steps[static_cast<size_t>(end - 1)]);
    for (int64_t t = 0; t < matrix.cols; ++t) {
      double largest = -1.0;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = static_cast<int64_t>(row_indices[static_cast<size_t>(r)]);
        if (row >= matrix.rows) continue;  // the matrix may be one flush shorter than /train/step
        const double v = matrix.at(row, t);
        if (std::isfinite(v) && v > largest) largest = v;
      }
      // A log scale has no place for 0: an all-zero column stays empty (NaN), like an unmeasured one.
      if (largest > 0.0) out.log10_grad_norm[static_cast<size_t>(t)][static_cast<size_t>(c)] = std::log10(largest);
    }
  }
  return out;
}

EvalResult read_eval_file(const std::string& path) {
  const checkpoint::H5Reader h5(path);
  EvalResult out;
  out.file = path;
  try {
    if (h5.string_attribute("/", "format") != "keel-eval")
      throw std::runtime_error("attribute format is not keel-eval");
    out.step = h5.int_attribute("/", "step");
    const nlohmann::json names = nlohmann::json::parse(h5.read_text("/source_names"));
    if (!names.is_array()) throw std::runtime_error("/source_names is not a JSON list");
    for (const auto& name : names) {
      const std::string g = "/validation/" + name.get<std::string>();
      EvalSource s;
      s.source = name.get<std::string>();
      s.nll = raw_values<double>(h5.read_tensor(g + "/nll"), checkpoint::DType::kFloat64, g + "/nll").at(0);
      s.perplexity =
          raw_values<double>(h5.read_tensor(g + "/perplexity"), checkpoint::DType::kFloat64, g + "/perplexity").at(0);
      s.tokens = raw_values<int64_t>(h5.read_tensor(g + "/tokens"), checkpoint::DType::kInt64, g + "/tokens").at(0);
      s.seen_in_training = raw_values<int64_t>(h5.read_tensor(g + "/seen_in_training"), checkpoint::DType::kInt64,
                                               g + "/seen_in_training")
                               .at(0);
      out.sources.push_back(std::move(s));
    }
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": not a readable keel eval file: " + e.what());
  }
  return out;
}

std::vector<EvalResult> read_eval_curve(const std::string& path) {
  const checkpoint::H5Reader h5(path);
  std::vector<EvalResult> out;
  try {
    if (h5.string_attribute("/", "format") != "keel-eval-curve")
      throw std::runtime_error("attribute format is not keel-eval-curve");
    const std::vector<int64_t> steps = raw_values<int64_t>(h5.read_tensor("/step"), checkpoint::DType::kInt64, "/step");
    for (int64_t step : steps) out.push_back({step, path, {}});
    const nlohmann::json names = nlohmann::json::parse(h5.read_text("/source_names"));
    if (!names.is_array()) throw std::runtime_error("/source_names is not a JSON list");
    for (const auto& name : names) {
      const std::string g = "/validation/" + name.get<std::string>();
      const auto f64 = [&](const std::string& what) {
        return raw_values<double>(h5.read_tensor(g + what), checkpoint::DType::kFloat64, g + what);
      };
      const auto i64 = [&](const std::string& what) {
        return raw_values<int64_t>(h5.read_tensor(g + what), checkpoint::DType::kInt64, g + what);
      };
      const std::vector<double> nll = f64("/nll"), perplexity = f64("/perplexity");
      const std::vector<int64_t> tokens = i64("/tokens"), seen = i64("/seen_in_training");
      for (size_t i = 0; i < steps.size(); ++i)
        out[i].sources.push_back({name.get<std::string>(), nll.at(i), perplexity.at(i), tokens.at(i), seen.at(i)});
    }
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": not a readable keel eval curve: " + e.what());
  }
  return out;
}

RunData gather_run(const std::string& run_dir, const GatherOptions& options) {
  if (!fs::is_directory(run_dir)) throw std::runtime_error(run_dir + ": no such run directory");
  const std::string metrics_path = (fs::path(run_dir) / "metrics.h5").string();
  if (!fs::exists(metrics_path)) throw std::runtime_error(metrics_path + ": missing (not a Keel run dir?)");

  RunData run;
  run.dir = run_dir;
  run.name = basename_of(run_dir);
  run.arm = parse_arm_name(run_dir);

  const metrics::MetricsReader reader(metrics_path);
  const std::vector<int64_t> steps = reader.read_int64("/train/step");
  const auto series = [&](const char* name) {
    return reader.has_dataset(name) ? reader.read_double(name) : std::vector<double>{};
  };
  const std::vector<double> loss = series("/train/loss"), grad_norm = series("/train/grad_norm"),
                            lr = series("/train/lr"), tokens_per_s = series("/train/tokens_per_s"),
                            skipped = series("/train/skipped");
  std::vector<TrainRow> all(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    all[i] = {steps[i],         at_or_nan(loss, i),         at_or_nan(grad_norm, i),
              at_or_nan(lr, i), at_or_nan(tokens_per_s, i), i < skipped.size() && skipped[i] != 0.0};
  }
  std::vector<size_t> kept_rows;
  split_superseded(all, run.rows, run.superseded, &kept_rows);
  run.events = reader.read_events();
  run.config = reader.read_config();
  run.precursors = read_precursors(reader);

  if (reader.has_dataset("/train/tensor/grad_norm")) {
    const metrics::Matrix matrix = reader.read_matrix("/train/tensor/grad_norm");
    const std::vector<std::string> names = reader.read_string_attribute("/train/tensor/grad_norm", "names");
    std::vector<int64_t> kept_steps;
    for (const auto& row : run.rows) kept_steps.push_back(row.step);
    run.heatmap = bucket_heatmap(matrix, names, kept_rows, kept_steps, options.max_heatmap_columns);
  }

  if (reader.has_dataset("/train/source_loss")) {
    const metrics::Matrix matrix = reader.read_matrix("/train/source_loss");
    run.source_names = reader.read_string_attribute("/train/source_loss", "names");
    for (const size_t row : kept_rows) {
      std::vector<double> values(run.source_names.size(), std::numeric_limits<double>::quiet_NaN());
      for (size_t c = 0; c < values.size() && static_cast<int64_t>(c) < matrix.cols; ++c) {
        if (static_cast<int64_t>(row) < matrix.rows)
          values[c] = matrix.at(static_cast<int64_t>(row), static_cast<int64_t>(c));
      }
      run.source_loss.push_back(std::move(values));
    }
  }

  const fs::path lineage_path = fs::path(run_dir) / "lineage.json";
  if (fs::exists(lineage_path)) {
    run.lineage = checkpoint::parse_lineage(checkpoint::read_small_file(lineage_path.string()), lineage_path.string());
  }

  const fs::path eval_dir = fs::path(run_dir) / "eval";
  if (fs::is_directory(eval_dir)) {
    static const std::regex kEvalFile(R"(^step-[0-9]+\.h5$)");
    std::vector<std::string> files;
    for (const auto& entry : fs::directory_iterator(eval_dir)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_regular_file() && std::regex_match(name, kEvalFile)) files.push_back(entry.path().string());
    }
    for (const auto& file : files) run.evals.push_back(read_eval_file(file));
    // `keel eval --all`'s curve: its steps that have no step-N.h5 of their own.
    const fs::path curve = eval_dir / "curve.h5";
    if (fs::is_regular_file(curve)) {
      for (auto& result : read_eval_curve(curve.string())) {
        const bool covered =
            std::any_of(run.evals.begin(), run.evals.end(), [&](const EvalResult& e) { return e.step == result.step; });
        if (!covered) run.evals.push_back(std::move(result));
      }
    }
    std::sort(run.evals.begin(), run.evals.end(),
              [](const EvalResult& a, const EvalResult& b) { return a.step < b.step; });
  }
  return run;
}

double final_train_loss(const std::vector<TrainRow>& rows) {
  if (rows.empty()) return kNaN;
  const size_t tail = std::max<size_t>(1, (rows.size() + 9) / 10);  // ceil(10%)
  double sum = 0.0;
  size_t n = 0;
  for (size_t i = rows.size() - tail; i < rows.size(); ++i) {
    if (std::isfinite(rows[i].loss)) {
      sum += rows[i].loss;
      ++n;
    }
  }
  return n ? sum / static_cast<double>(n) : kNaN;
}

}  // namespace keel::report

// Why: see precursors.h.
#include "core/report/precursors.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <regex>
#include <stdexcept>

#include "core/report/run_data.h"

namespace keel::report {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A /stats series as [rows][cols] doubles (1-D series: one column).
std::vector<std::vector<double>> read_rows(const metrics::MetricsReader& reader, const std::string& path) {
  std::vector<std::vector<double>> out;
  if (reader.info(path).shape.size() == 1) {
    for (double v : reader.read_double(path)) out.push_back({v});
    return out;
  }
  const metrics::Matrix m = reader.read_matrix(path);
  for (int64_t r = 0; r < m.rows; ++r) {
    std::vector<double> row;
    for (int64_t c = 0; c < m.cols; ++c) row.push_back(m.at(r, c));
    out.push_back(std::move(row));
  }
  return out;
}

double median_of(std::vector<double> values) {
  if (values.empty()) return kNaN;
  std::sort(values.begin(), values.end());
  return values[(values.size() - 1) / 2];
}

std::string detector_of(const std::string& text) {
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close != std::string::npos) return text.substr(1, close - 1);
  }
  static const std::regex kParenthesised(R"(\(([A-Za-z0-9_\-]+): )");  // a rollback: "... (rollback_skip: why)"
  std::smatch m;
  if (std::regex_search(text, m, kParenthesised)) return m[1].str();
  return "keel";
}

double z_score_of(const std::string& text) {
  static const std::regex kZ(R"(z-score (-?[0-9.]+(?:[eE][-+]?[0-9]+)?))");
  std::smatch m;
  return std::regex_search(text, m, kZ) ? std::strtod(m[1].str().c_str(), nullptr) : kNaN;
}

}  // namespace

PrecursorStats read_precursors(const metrics::MetricsReader& reader) {
  PrecursorStats out;
  if (!reader.has_dataset("/stats/step")) return out;
  const std::vector<int64_t> steps = reader.read_int64("/stats/step");
  const auto attn = read_rows(reader, "/stats/attn_logit_max");
  const auto rms = read_rows(reader, "/stats/block_rms");
  const auto z = read_rows(reader, "/stats/z_max");
  if (attn.size() < steps.size() || rms.size() < steps.size() || z.size() < steps.size())
    throw std::runtime_error(reader.path() + ": /stats/ series have fewer rows than /stats/step (" +
                             std::to_string(steps.size()) + ")");
  const size_t layers = rms.empty() ? 0 : rms.front().size();
  if (layers == 0 || attn.front().size() % layers != 0)
    throw std::runtime_error(reader.path() + ": /stats/attn_logit_max has " + std::to_string(attn.front().size()) +
                             " columns, not layers x heads for the " + std::to_string(layers) +
                             " layers of /stats/block_rms");
  const size_t heads = attn.front().size() / layers;
  std::map<int64_t, size_t> last_row;  // a re-run step: its last row counts
  for (size_t i = 0; i < steps.size(); ++i) last_row[steps[i]] = i;
  out.attn_logit_max.assign(layers, {});
  out.block_rms.assign(layers, {});
  for (const auto& [step, row] : last_row) {
    out.steps.push_back(step);
    out.z_max.push_back(z[row][0]);
    for (size_t l = 0; l < layers; ++l) {
      double m = kNaN;
      for (size_t h = 0; h < heads; ++h) {
        const double v = attn[row][l * heads + h];
        if (std::isfinite(v) && !(v <= m)) m = v;  // max over the heads, NaN-safe
      }
      out.attn_logit_max[l].push_back(m);
      out.block_rms[l].push_back(rms[row][l]);
    }
  }
  return out;
}

std::vector<SpikeRow> spike_rows(const RunData& run) {
  static const std::vector<std::string> kActions = {"skip", "rollback", "stop", "lr_factor"};
  constexpr size_t kWindow = 20;
  std::vector<SpikeRow> out;
  for (const auto& e : run.events) {
    if (std::find(kActions.begin(), kActions.end(), e.kind) == kActions.end()) continue;
    SpikeRow row{e.step, detector_of(e.text), e.kind, z_score_of(e.text), e.text, {}};
    // The step's kept row and the per-source losses of it and the steps before it.
    const auto it = std::find_if(run.rows.begin(), run.rows.end(), [&](const TrainRow& r) { return r.step == e.step; });
    const auto index = static_cast<size_t>(it - run.rows.begin());
    if (it != run.rows.end() && index < run.source_loss.size()) {
      for (size_t s = 0; s < run.source_names.size(); ++s) {
        const double now = run.source_loss[index][s];
        if (!std::isfinite(now)) continue;
        std::vector<double> before;
        for (size_t k = index >= kWindow ? index - kWindow : 0; k < index; ++k)
          if (std::isfinite(run.source_loss[k][s])) before.push_back(run.source_loss[k][s]);
        const double base = median_of(before);
        if (std::isfinite(base)) row.top_sources.emplace_back(run.source_names[s], now - base);
      }
      std::sort(row.top_sources.begin(), row.top_sources.end(),
                [](const auto& a, const auto& b) { return a.second > b.second; });
      if (row.top_sources.size() > 3) row.top_sources.resize(3);
    }
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace keel::report

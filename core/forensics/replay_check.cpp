// Why: see replay_check.h.
#include "core/forensics/replay_check.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "core/metrics/metrics_reader.h"

namespace keel::forensics {
namespace {

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

std::string digits(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}
std::string digits(float v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(v));
  return buf;
}

// The per-sample losses of each step: /data/sample_loss is aligned with /data/batch; a step's rows form a block
// (slots increase), and a step run again keeps its later block.
void read_sample_losses(const metrics::MetricsReader& reader, std::map<int64_t, LoggedStep>& steps) {
  if (!reader.has_dataset("/data/batch") || !reader.has_dataset("/data/sample_loss")) return;
  const std::vector<metrics::BatchRow> rows = reader.read_batch();
  const std::vector<double> losses = reader.read_double("/data/sample_loss");
  const size_t n = std::min(rows.size(), losses.size());
  std::map<int64_t, std::vector<float>> blocks;
  for (size_t i = 0; i < n; ++i) {
    const bool starts = i == 0 || rows[i].step != rows[i - 1].step || rows[i].slot <= rows[i - 1].slot;
    std::vector<float>& block = blocks[rows[i].step];
    if (starts) block.clear();
    block.push_back(static_cast<float>(losses[i]));
  }
  for (auto& [step, block] : blocks) {
    auto it = steps.find(step);
    if (it != steps.end()) it->second.sample_losses = std::move(block);
  }
}

}  // namespace

LoggedRun read_logged_run(const std::string& metrics_h5) {
  const metrics::MetricsReader reader(metrics_h5);
  LoggedRun run;
  run.path = metrics_h5;
  const std::vector<int64_t> step = reader.read_int64("/train/step");
  const std::vector<double> loss = reader.read_double("/train/loss");
  const std::vector<double> grad_norm = reader.read_double("/train/grad_norm");
  const bool per_tensor = reader.has_dataset("/train/tensor/grad_norm");
  metrics::Matrix grads, weights;
  if (per_tensor) {
    run.tensor_names = reader.read_string_attribute("/train/tensor/grad_norm", "names");
    grads = reader.read_matrix("/train/tensor/grad_norm");
    weights = reader.read_matrix("/train/tensor/param_norm");
  }
  for (size_t i = 0; i < step.size(); ++i) {  // /train/step is never longer than another column
    LoggedStep row;
    row.step = step[i];
    row.loss = loss.at(i);
    row.grad_norm = grad_norm.at(i);
    if (per_tensor) {
      const auto r = static_cast<int64_t>(i);
      for (int64_t c = 0; c < grads.cols; ++c) row.tensor_grad_norms.push_back(grads.at(r, c));
      for (int64_t c = 0; c < weights.cols; ++c) row.tensor_param_norms.push_back(weights.at(r, c));
    }
    run.steps[row.step] = std::move(row);
  }
  read_sample_losses(reader, run.steps);
  return run;
}

std::optional<Mismatch> compare_step(const LoggedStep& logged, const LoggedStep& replayed,
                                     const std::vector<std::string>& tensor_names) {
  const int64_t step = logged.step;
  if (!same_bits(logged.loss, replayed.loss)) return Mismatch{step, "loss", digits(logged.loss), digits(replayed.loss)};
  if (!same_bits(logged.grad_norm, replayed.grad_norm))
    return Mismatch{step, "grad_norm", digits(logged.grad_norm), digits(replayed.grad_norm)};
  const auto name = [&](size_t i) { return i < tensor_names.size() ? tensor_names[i] : "#" + std::to_string(i); };
  const struct {
    const char* what;
    const std::vector<float>& a;
    const std::vector<float>& b;
  } per_tensor[] = {{"tensor_grad_norm ", logged.tensor_grad_norms, replayed.tensor_grad_norms},
                    {"tensor_param_norm ", logged.tensor_param_norms, replayed.tensor_param_norms}};
  for (const auto& t : per_tensor) {
    if (t.a.empty() || t.b.empty()) continue;
    if (t.a.size() != t.b.size())
      return Mismatch{step, std::string(t.what) + "count", std::to_string(t.a.size()), std::to_string(t.b.size())};
    for (size_t i = 0; i < t.a.size(); ++i) {
      if (!same_bits(t.a[i], t.b[i])) return Mismatch{step, t.what + name(i), digits(t.a[i]), digits(t.b[i])};
    }
  }
  const auto& a = logged.sample_losses;
  const auto& b = replayed.sample_losses;
  if (!a.empty() && !b.empty()) {
    if (a.size() != b.size())
      return Mismatch{step, "sample_loss count", std::to_string(a.size()), std::to_string(b.size())};
    for (size_t i = 0; i < a.size(); ++i) {
      if (!same_bits(a[i], b[i]))
        return Mismatch{step, "sample_loss slot " + std::to_string(i), digits(a[i]), digits(b[i])};
    }
  }
  return std::nullopt;
}

std::string describe(const Mismatch& m) {
  return "step " + std::to_string(m.step) + ": " + m.what + " differs (logged " + m.logged + ", replayed " +
         m.replayed + ")";
}

ReplayCheck::ReplayCheck(const std::string& parent_metrics_h5, int64_t first_step, int64_t steps)
    : first_step_(first_step) {
  LoggedRun all = read_logged_run(parent_metrics_h5);
  expected_.path = all.path;
  expected_.tensor_names = std::move(all.tensor_names);
  for (int64_t step = first_step; step < first_step + steps; ++step) {
    auto it = all.steps.find(step);
    if (it == all.steps.end()) break;  // the overlap ends where the parent's log does
    expected_.steps.emplace(step, std::move(it->second));
  }
}

bool ReplayCheck::covers(int64_t step) const { return expected_.steps.count(step) > 0; }

void ReplayCheck::check(const LoggedStep& replayed) const {
  const auto it = expected_.steps.find(replayed.step);
  if (it == expected_.steps.end()) return;
  if (const auto m = compare_step(it->second, replayed, expected_.tensor_names)) {
    throw std::runtime_error("resume.verify_steps: " + describe(*m) + " against the parent's " + expected_.path);
  }
}

}  // namespace keel::forensics

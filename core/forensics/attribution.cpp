// Why: see attribution.h.
#include "core/forensics/attribution.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>

namespace keel::forensics {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Window {
  std::deque<double> values;
  double mean() const {
    double sum = 0.0;
    for (double v : values) sum += v;
    return values.empty() ? 0.0 : sum / static_cast<double>(values.size());
  }
  // The population std, floored as the detector floors it (1e-4 |mean| + 1e-12).
  double floored_std() const {
    const double m = mean();
    double sum_sq = 0.0;
    for (double v : values) sum_sq += (v - m) * (v - m);
    const double std = values.empty() ? 0.0 : std::sqrt(sum_sq / static_cast<double>(values.size()));
    return std::max(std, 1e-4 * std::fabs(m) + 1e-12);
  }
  double z(double v) const { return (v - mean()) / floored_std(); }
};

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

// The kept samples' loss and grad norm when the slots in `removed` (distinct) are taken out.
struct SubsetValues {
  double loss = 0.0, grad_norm = 0.0;
};

SubsetValues subset_values(const SampleGradients& g, const std::vector<int64_t>& removed) {
  const int64_t B = g.samples;
  double loss_sum = 0.0, gram_sum = 0.0;
  for (int64_t i = 0; i < B; ++i) loss_sum += g.loss[static_cast<size_t>(i)];
  for (double v : g.gram) gram_sum += v;
  // |sum over kept|^2 = total - 2 sum_{r in R} rowsum_r + sum_{r, s in R} K_rs
  for (int64_t r : removed) {
    loss_sum -= g.loss[static_cast<size_t>(r)];
    double row = 0.0;
    for (int64_t j = 0; j < B; ++j) row += g.gram[static_cast<size_t>(r * B + j)];
    gram_sum -= 2.0 * row;
    for (int64_t s : removed) gram_sum += g.gram[static_cast<size_t>(r * B + s)];
  }
  const auto kept = static_cast<double>(B - static_cast<int64_t>(removed.size()));
  return {loss_sum / kept, std::sqrt(std::max(gram_sum, 0.0)) / kept};
}

std::vector<int64_t> as_slots(const std::vector<bool>& removed) {
  std::vector<int64_t> slots;
  for (size_t i = 0; i < removed.size(); ++i) {
    if (removed[i]) slots.push_back(static_cast<int64_t>(i));
  }
  return slots;
}

struct Target {
  double max_loss, max_grad_norm;
  bool within(const SubsetValues& v) const { return v.loss <= max_loss && v.grad_norm <= max_grad_norm; }
  // The larger relative excess over the two maxima (<= 0 when within).
  double excess(const SubsetValues& v) const {
    const double l = std::isinf(max_loss) ? -kInf : (v.loss - max_loss) / std::max(std::fabs(max_loss), 1e-12);
    const double n =
        std::isinf(max_grad_norm) ? -kInf : (v.grad_norm - max_grad_norm) / std::max(std::fabs(max_grad_norm), 1e-12);
    return std::max(l, n);
  }
};

// Greedy removal until within (or one sample is left); the removed slots in removal order.
std::vector<int64_t> greedy(const SampleGradients& g, const Target& t, SearchResult& result) {
  std::vector<int64_t> removed;
  SubsetValues now = subset_values(g, removed);
  while (!t.within(now) && static_cast<int64_t>(removed.size()) + 1 < g.samples) {
    int64_t best = -1;
    double best_excess = kInf;
    for (int64_t i = 0; i < g.samples; ++i) {
      if (std::find(removed.begin(), removed.end(), i) != removed.end()) continue;
      std::vector<int64_t> trial = removed;
      trial.push_back(i);
      const double e = t.excess(subset_values(g, trial));
      if (e < best_excess) best = i, best_excess = e;
    }
    removed.push_back(best);
    now = subset_values(g, removed);
    result.trace.push_back({best, now.loss, now.grad_norm});
  }
  return t.within(now) ? removed : std::vector<int64_t>{};
}

// The best set of exactly k slots (lowest excess) that is within, if any.
std::optional<std::vector<int64_t>> best_of_size(const SampleGradients& g, const Target& t, int64_t k) {
  std::vector<int64_t> pick(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) pick[static_cast<size_t>(i)] = i;
  std::optional<std::vector<int64_t>> best;
  double best_excess = kInf;
  while (true) {
    const SubsetValues v = subset_values(g, pick);
    if (t.within(v) && t.excess(v) < best_excess) best = pick, best_excess = t.excess(v);
    int64_t i = k - 1;  // next combination in lexicographic order
    while (i >= 0 && pick[static_cast<size_t>(i)] == g.samples - k + i) --i;
    if (i < 0) break;
    ++pick[static_cast<size_t>(i)];
    for (int64_t j = i + 1; j < k; ++j) pick[static_cast<size_t>(j)] = pick[static_cast<size_t>(j - 1)] + 1;
  }
  return best;
}

double choose(int64_t n, int64_t k) {
  double c = 1.0;
  for (int64_t i = 1; i <= k; ++i) c = c * static_cast<double>(n - k + i) / static_cast<double>(i);
  return c;
}

}  // namespace

Threshold spike_threshold(const LoggedRun& run, int64_t step, const ThresholdOptions& o) {
  Window loss, grad;
  for (const auto& [s, row] : run.steps) {
    if (s >= step) break;
    if (!std::isfinite(row.loss) || !std::isfinite(row.grad_norm)) continue;
    const bool full = static_cast<int64_t>(loss.values.size()) >= o.min_history;
    if (full && (loss.z(row.loss) > o.z || grad.z(row.grad_norm) > o.z)) continue;  // a spike: kept out
    loss.values.push_back(row.loss);
    grad.values.push_back(row.grad_norm);
    while (static_cast<int64_t>(loss.values.size()) > o.window) loss.values.pop_front(), grad.values.pop_front();
  }
  Threshold t;
  t.history = static_cast<int64_t>(loss.values.size());
  t.loss_mean = loss.mean();
  t.loss_std = loss.floored_std();
  t.grad_mean = grad.mean();
  t.grad_std = grad.floored_std();
  const bool zscore = t.history >= o.min_history;
  t.max_loss = o.max_loss ? *o.max_loss : zscore ? t.loss_mean + o.z * t.loss_std : kInf;
  t.max_grad_norm = o.max_grad_norm ? *o.max_grad_norm : zscore ? t.grad_mean + o.z * t.grad_std : kInf;
  t.defined = zscore || o.max_loss || o.max_grad_norm;
  t.rule = zscore ? "zscore_skip's rule: z <= " + number(o.z) + " over the last " + std::to_string(o.window) +
                        " non-spike logged steps before step " + std::to_string(step) + " (" +
                        std::to_string(t.history) + " values)"
                  : "";
  if (o.max_loss || o.max_grad_norm)
    t.rule = std::string(t.rule.empty() ? "" : t.rule + ", ") + "explicit maxima (--max-loss " +
             (o.max_loss ? number(*o.max_loss) : "-") + ", --max-grad-norm " +
             (o.max_grad_norm ? number(*o.max_grad_norm) : "-") + ")";
  return t;
}

double SampleGradients::batch_grad_norm() const { return subset_values(*this, {}).grad_norm; }

double SampleGradients::grad_norm(int64_t i) const {
  return std::sqrt(std::max(gram[static_cast<size_t>(i * samples + i)], 0.0));
}

double SampleGradients::grad_share(int64_t i) const {
  double row = 0.0, total = 0.0;
  for (int64_t j = 0; j < samples; ++j) row += gram[static_cast<size_t>(i * samples + j)];
  for (double v : gram) total += v;
  // <g_i / B, sum_j g_j / |sum_j g_j|>
  return total <= 0.0 ? 0.0 : row / static_cast<double>(samples) / std::sqrt(total);
}

double SampleGradients::subset_loss(const std::vector<bool>& removed) const {
  return subset_values(*this, as_slots(removed)).loss;
}

double SampleGradients::subset_grad_norm(const std::vector<bool>& removed) const {
  return subset_values(*this, as_slots(removed)).grad_norm;
}

SampleGradients per_sample_gradients(const model::Llama& model, const torch::Tensor& windows,
                                     torch::ScalarType compute_dtype, int64_t max_bytes) {
  TORCH_CHECK(windows.dim() == 2 && windows.size(1) >= 2, "per_sample_gradients: windows must be [B, T+1], got ",
              windows.sizes());
  std::vector<torch::Tensor> params = model->parameters();
  SampleGradients g;
  g.samples = windows.size(0);
  for (const auto& p : params) g.parameters += p.numel();
  const double need = static_cast<double>(g.samples) * static_cast<double>(g.parameters) * 4.0;
  if (need > static_cast<double>(max_bytes))
    throw std::runtime_error("per-sample gradients of " + std::to_string(g.samples) + " samples x " +
                             std::to_string(g.parameters) + " parameters need " + number(need / (1 << 20)) +
                             " MiB, above the cap of " + number(static_cast<double>(max_bytes) / (1 << 20)) +
                             " MiB (--max-memory-mb)");
  torch::Tensor grads = torch::zeros({g.samples, g.parameters}, torch::kFloat32);  // [B, P]
  for (int64_t i = 0; i < g.samples; ++i) {
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    const model::CrossEntropyParts parts = model->loss(windows.narrow(0, i, 1), compute_dtype);  // one sample
    parts.loss.backward();
    g.loss.push_back(parts.nll.item<double>());
    int64_t offset = 0;
    for (const auto& p : params) {
      if (p.grad().defined())
        grads[i].narrow(0, offset, p.numel()).copy_(p.grad().detach().reshape({-1}).to(torch::kFloat32));
      offset += p.numel();
    }
  }
  for (auto& p : params) p.mutable_grad() = torch::Tensor();
  const torch::Tensor gram =
      torch::mm(grads.to(torch::kFloat64), grads.to(torch::kFloat64).t()).contiguous();  // [B, B]
  g.gram.assign(gram.data_ptr<double>(), gram.data_ptr<double>() + gram.numel());
  return g;
}

SearchResult search_removal(const SampleGradients& g, double max_loss, double max_grad_norm) {
  const Target t{max_loss, max_grad_norm};
  SearchResult result;
  const SubsetValues full = subset_values(g, {});
  result.trace.push_back({-1, full.loss, full.grad_norm});
  if (t.within(full)) {
    result.within_at_start = result.reached = true;
    result.method = "none needed: the full batch is within the threshold";
    return result;
  }
  std::vector<int64_t> set = greedy(g, t, result);
  if (set.empty()) {
    result.method = "greedy: no set that keeps a sample brings the step within the threshold";
    return result;
  }
  // Pruning: put back every removed sample the set does not need, last removed first.
  for (size_t k = set.size(); k-- > 0;) {
    std::vector<int64_t> trial = set;
    trial.erase(trial.begin() + static_cast<std::ptrdiff_t>(k));
    if (t.within(subset_values(g, trial))) set = trial;
  }
  result.method = "greedy, then pruned";
  // Exhaustive over every smaller set while that is at most 10^6 subsets: the smallest set.
  double tried = 0.0;
  bool exhaustive = true;
  for (int64_t k = 1; k < static_cast<int64_t>(set.size()); ++k) {
    tried += choose(g.samples, k);
    if (tried > 1e6) {
      exhaustive = false;
      break;
    }
    if (auto smaller = best_of_size(g, t, k)) {
      set = *smaller;
      break;
    }
  }
  if (exhaustive) result.method = "exhaustive over every smaller set (the smallest set)";
  std::sort(set.begin(), set.end());
  result.removed = set;
  result.reached = true;
  const SubsetValues end = subset_values(g, set);
  result.trace.push_back({-1, end.loss, end.grad_norm});
  return result;
}

std::vector<std::string> skip_specs(const std::vector<BatchSample>& batch, const std::vector<int64_t>& removed,
                                    const std::vector<std::string>& sources) {
  std::map<std::pair<int32_t, int64_t>, int64_t> in_batch, in_set;  // (source, chunk) -> samples
  for (const auto& s : batch) ++in_batch[{s.source, s.chunk}];
  for (int64_t slot : removed) {
    const BatchSample& s = batch.at(static_cast<size_t>(slot));
    ++in_set[{s.source, s.chunk}];
  }
  const auto name = [&](int32_t source) {
    return source >= 0 && static_cast<size_t>(source) < sources.size() ? sources[static_cast<size_t>(source)]
                                                                       : "#" + std::to_string(source);
  };
  std::vector<std::string> specs;
  std::map<int32_t, std::set<int64_t>> ids;  // samples outside whole chunks, by source
  for (const auto& [key, n] : in_set) {
    if (n >= 2 && n == in_batch[key]) specs.push_back(name(key.first) + ":chunk:" + std::to_string(key.second));
  }
  for (int64_t slot : removed) {
    const BatchSample& s = batch.at(static_cast<size_t>(slot));
    const auto key = std::make_pair(s.source, s.chunk);
    if (!(in_set[key] >= 2 && in_set[key] == in_batch[key])) ids[s.source].insert(s.sample_id);
  }
  for (const auto& [source, set] : ids) {
    for (auto it = set.begin(); it != set.end();) {
      const int64_t first = *it;
      int64_t last = first;
      while (++it != set.end() && *it == last + 1) last = *it;
      specs.push_back(name(source) + ":samples:" + std::to_string(first) +
                      (last != first ? "-" + std::to_string(last) : ""));
    }
  }
  return specs;
}

}  // namespace keel::forensics

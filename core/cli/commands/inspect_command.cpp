// Why: `keel inspect RUN_DIR` answers "what is this run?" without h5py: its config, how far it got, a metrics
// summary and its events. (Checkpoint directories join when complete checkpoints land.)
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <numeric>

#include "core/cli/commands/commands.h"
#include "core/metrics/metrics_reader.h"

namespace keel::cli {

int cmd_inspect(const Args& args) {
  if (args.size() != 1 || args[0].rfind("--", 0) == 0) throw std::runtime_error("usage: keel inspect RUN_DIR");
  const std::string run_dir = args[0];
  const std::string metrics_path = run_dir + "/metrics.h5";
  if (!std::filesystem::exists(metrics_path))
    throw std::runtime_error(run_dir + " is not a Keel run dir: " + metrics_path + " not found");
  metrics::MetricsReader reader(metrics_path);

  std::cout << "run dir: " << run_dir << "\n\nconfig:\n";
  for (const auto& [key, value] : reader.read_config()) std::cout << "  " << key << " = " << value << "\n";

  std::vector<int64_t> steps = reader.read_int64("/train/step");
  std::vector<double> loss = reader.read_double("/train/loss");
  std::vector<double> grad_norm = reader.read_double("/train/grad_norm");
  std::vector<double> tokens_per_s = reader.read_double("/train/tokens_per_s");
  std::vector<int64_t> tokens = reader.read_int64("/train/tokens");
  // A kill during a flush can leave some columns one flush longer than /train/step: use the common length.
  const size_t rows = std::min({steps.size(), loss.size(), grad_norm.size(), tokens_per_s.size(), tokens.size()});
  steps.resize(rows);
  loss.resize(rows);
  grad_norm.resize(rows);
  tokens_per_s.resize(rows);
  tokens.resize(rows);
  std::cout << "\nmetrics: " << steps.size() << " steps";
  if (!steps.empty()) {
    std::cout << " (" << steps.front() << " .. " << steps.back() << "), " << tokens.back() << " tokens\n";
    auto mean_of = [](const std::vector<double>& v, size_t from, size_t to) {
      double sum = 0.0;
      for (size_t i = from; i < to; ++i) sum += v[i];
      return sum / std::max<size_t>(1, to - from);
    };
    const size_t n = loss.size(), window = std::max<size_t>(1, std::min<size_t>(10, n / 2));
    std::cout << std::fixed << std::setprecision(4) << "  loss: first " << loss.front() << ", last " << loss.back()
              << ", min " << *std::min_element(loss.begin(), loss.end()) << " (mean of first " << window << ": "
              << mean_of(loss, 0, window) << ", last " << window << ": " << mean_of(loss, n - window, n) << ")\n"
              << "  grad norm: last " << grad_norm.back() << ", max " << *std::max_element(grad_norm.begin(), grad_norm.end())
              << "\n";
    // Median throughput after the warm-up steps (allocator and thread-pool warm-up distort the first few).
    const size_t warmup = std::min<size_t>(5, tokens_per_s.size() - 1);
    std::vector<double> sorted(tokens_per_s.begin() + warmup, tokens_per_s.end());
    std::sort(sorted.begin(), sorted.end());
    std::cout << std::setprecision(0) << "  tokens/s: median " << sorted[sorted.size() / 2] << " (after " << warmup
              << " warm-up steps)\n";
  } else {
    std::cout << "\n";
  }
  const auto events = reader.read_events();
  std::cout << "\nevents: " << events.size() << "\n";
  for (const auto& e : events) std::cout << "  step " << e.step << "  " << e.kind << "  " << e.text << "\n";
  return 0;
}

}  // namespace keel::cli

// Why: see trainer_state.h.
#include "core/train/trainer_state.h"

#include <cstdio>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/durable_fs.h"

namespace keel::train {

TestFault parse_test_fault(const char* spec) {
  TestFault f;
  if (!spec || !*spec) return f;
  char kind[32] = {0};
  long long rank = -1, step = -1;
  if (std::sscanf(spec, "%31[a-z_]:%lld:%lld", kind, &rank, &step) == 3) f = {kind, rank, step};
  return f;
}

void TrainerState::record_failure(int64_t step, const std::string& text) {
  if (failure_recorded || !metrics) return;
  failure_recorded = true;
  try {
    metrics->event(step, "error", text);
    metrics->flush();
  } catch (const std::exception&) {
  }
}

std::string TrainerState::newest_checkpoint() const {
  const auto latest = checkpoints->latest_pointer();
  return latest ? *latest : "";
}

void TrainerState::write_lineage() {
  // The global batch changes of this run's own steps, from the loader's history (train.batch_schedule, or a
  // resume that adopted another batch): recomputed at each write, so that the lineage follows the ledger.
  if (loader) {
    lineage.batch_changes.clear();
    const int64_t start = lineage.is_root() ? 0 : lineage.parent_step;
    const std::vector<BatchStage>& history = loader->batch_history();
    for (size_t i = 1; i < history.size(); ++i) {
      const BatchStage& b = history[i];
      if (b.from_step < start || b.global_batch == history[i - 1].global_batch) continue;
      lineage.batch_changes.push_back({b.from_step, history[i - 1].global_batch, b.global_batch, b.origin});
    }
  }
  if (rank0()) checkpoint::write_file_atomically(paths.lineage_json(), checkpoint::lineage_to_json(lineage));
}

void TrainerState::stop_if_weights_not_finite(int64_t step) {
  std::string bad;
  {
    torch::NoGradGuard no_grad;
    for (const auto& p : params) {
      if (!torch::isfinite(p.param).all().item<bool>()) {
        bad = p.name;
        break;
      }
    }
  }
  const std::vector<std::string> all = groups.world->all_gather_strings(bad);
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].empty()) continue;
    std::string transforms;
    for (auto& t : plugins->grad_transforms()) transforms += (transforms.empty() ? "" : ", ") + t.name();
    throw std::runtime_error(
        "step " + std::to_string(step) + ": the weights are not finite (" + all[r] +
        (groups.world->single() ? "" : " on " + groups.layout.describe_rank(static_cast<int64_t>(r))) +
        "): an earlier update poisoned them (optimizer " + plugins->optimizer().name() +
        (transforms.empty() ? "" : ", grad transforms " + transforms) + "); the run stops");
  }
}

BoundaryStatus TrainerState::boundary_status(bool failed, bool stop) {
  const BoundaryStatus local = failed ? BoundaryStatus::kFailed
                               : stop ? BoundaryStatus::kStop
                                      : BoundaryStatus::kContinue;
  if (groups.world->single()) return local;
  at::Tensor code = torch::full({1}, static_cast<float>(local));
  groups.world->all_reduce(code, parallel::ReduceOp::kMax);
  return static_cast<BoundaryStatus>(static_cast<int>(code.item<float>()));
}

void TrainerState::agree_or_throw(const std::string& error, const std::string& what) {
  const std::vector<std::string> errors = groups.world->all_gather_strings(error);
  for (size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty()) continue;
    throw checkpoint::CheckpointError(what + ": " + groups.layout.describe_rank(static_cast<int64_t>(r)) + ": " +
                                      errors[r]);
  }
}

}  // namespace keel::train

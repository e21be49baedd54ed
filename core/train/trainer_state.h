// Why: everything one rank's trainer holds, in one place, so that each stage of the step can live in its own
// file (step_reduction, checkpointer, plugin_swap, step_stages) and take exactly this state. The fields are
// grouped by who owns them; the small helpers here are the ones every stage needs: events, agreement across
// ranks, and the plugin-call boundary (every hook runs through call(), which names the plugin on an error).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/lineage.h"
#include "core/config/config.h"
#include "core/data/documents.h"
#include "core/data/loader.h"
#include "core/metrics/metrics_writer.h"
#include "core/model/llama.h"
#include "core/model/sharding.h"
#include "core/optim/schedule.h"
#include "core/optim/zero.h"
#include "core/parallel/grad_reducer.h"
#include "core/parallel/process_groups.h"
#include "core/plugin_host/plugin_host.h"
#include "core/train/run_dir.h"
#include "core/train/test_fault.h"

namespace keel::forensics {
class ReplayCheck;
}

namespace keel::train {

class AsyncSaver;  // async_saver.h: the checkpoint save in flight (checkpoint.async)

// What the ranks agree on at each step boundary, in order of precedence.
enum class BoundaryStatus { kContinue = 0, kStop = 1, kFailed = 2 };

// What one step produced, for the loop (the plugins saw `ctx`).
struct StepRecord {
  sdk::StepContext ctx;
  sdk::Decision decision;  // the final decision (built-in non-finite check or the spike handler's)
  std::string decided_by;  // "keel" or the spike handler's name
  double step_time_s = 0.0;
  std::vector<float> tensor_param_norms;  // per tensor, the weights this step's forward used (metrics.per_tensor)
  std::vector<float> sample_losses;       // [global batch] each sample's mean token loss, in slot order
  bool updated() const { return decision.action == sdk::Decision::Action::kContinue; }
};

struct TrainerState {
  // The run: its config, directory, place in the job, device and precision.
  Config config;
  RunPaths paths;
  parallel::ProcessGroups groups;
  torch::Device device{torch::kCPU};
  torch::ScalarType compute_dtype = torch::kFloat;
  TestFault fault;

  // The model and its parameters, as the step, the checkpoints and the plugins see them.
  model::Llama model{nullptr};
  std::vector<optim::NamedParameter> params;  // this rank's fp32 masters (its TP shards of its stage), model order
  std::vector<model::ShardSpec> specs;        // per entry of params: how it splits over TP
  std::vector<int64_t> global_index;          // per entry of params: its index in tensor_names
  std::vector<sdk::Param> plugin_params;      // the same tensors, as plugins see them
  std::vector<sdk::Param> optimizer_params;   // the ones this rank's optimizer updates (all, or its ZeRO-1 share)
  std::vector<std::string> tensor_names;      // every parameter of the whole model (all stages), model order
  optim::ZeroPartition zero;                  // owner DP rank of each entry of params (parallel.zero = 1)
  std::unique_ptr<parallel::GradReducer> reducer;

  // Plugins, data, records.
  std::unique_ptr<plugin_host::PluginHost> plugins;
  std::unique_ptr<data::DataLoader> loader;
  std::unique_ptr<metrics::MetricsWriter> metrics;  // rank 0 only
  std::unique_ptr<data::DocumentIndex> documents;   // rank 0: the documents behind /data/batch (batch_record.h)
  checkpoint::Lineage lineage;
  std::unique_ptr<checkpoint::CheckpointStore> checkpoints;
  std::string last_checkpoint;
  std::shared_ptr<AsyncSaver> async_save;  // created by the first background save (checkpointer.cpp)
  // rank 0, resume.verify_steps > 0: the parent's logged rows this resume's first steps must reproduce
  // (core/forensics/replay_check.h); made at the first step.
  std::shared_ptr<forensics::ReplayCheck> replay_check;

  // Counters and factors carried in checkpoints.
  int64_t tokens_seen = 0;
  // An LR factor requested by a spike handler: LR x lr_factor while step < lr_factor_until (checkpointed).
  double lr_factor = 1.0;
  int64_t lr_factor_until = -1;
  int64_t rollbacks = 0;
  bool failure_recorded = false;  // record_failure() wrote the run's "error" event
  bool step_updated = false;  // the current step's update is applied and counted (a failure after it can checkpoint)

  bool rank0() const { return groups.is_rank0(); }
  bool zero_enabled() const { return config.parallel.zero == 1 && groups.layout.dp() > 1; }
  void event(int64_t step, const std::string& kind, const std::string& text) {
    if (metrics) metrics->event(step, kind, text);
  }
  // A failure that ends the run: an "error" event, flushed if metrics.h5 can still be written (it may be what
  // failed), so that the file says why the run stopped.
  void record_failure(int64_t step, const std::string& text);
  // The newest committed checkpoint, for messages ("" if none).
  std::string newest_checkpoint() const;
  void write_lineage();
  // Throws (naming the first non-finite tensor and the plugins that change weights) when any rank's weights are
  // not finite. A host read per tensor: only for the rare step whose loss or gradient is not finite.
  void stop_if_weights_not_finite(int64_t step);
  // The boundary status of the whole job: the most severe of every rank's (one collective).
  BoundaryStatus boundary_status(bool failed, bool stop);
  // Throws on every rank (naming the first failing rank) if `error` is non-empty on any rank.
  void agree_or_throw(const std::string& error, const std::string& what);

  // Runs `hook` on plugin `p` with ctx's output channels pointed at p (metrics "<plugin>.<name>", events
  // "[<plugin>] text"; written by rank 0); an exception names the plugin, its slot and the step.
  template <typename Hook>
  auto call(plugin_host::LoadedPlugin& p, sdk::StepContext& ctx, Hook&& hook) -> decltype(hook(*p.object)) {
    const std::string name = p.name();
    const int64_t step = ctx.step;
    ctx.metric = [this, name, step](const std::string& metric, double value) {
      if (metrics) metrics->scalar(step, name + "." + metric, value);
    };
    ctx.event = [this, name, step](const std::string& kind, const std::string& text) {
      event(step, kind, "[" + name + "] " + text);
    };
    try {
      return hook(*p.object);
    } catch (const std::exception& e) {
      throw plugin_host::PluginError("plugin " + name + " (" + p.slot + ") failed at step " + std::to_string(step) +
                                     (groups.world->single() ? "" : " on " + groups.describe()) + ": " + e.what());
    }
  }
};

}  // namespace keel::train

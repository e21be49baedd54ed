// Why: the readable training loop, llm.c-style: train() -> train_step() -> forward_backward(). Each stage of a
// step is one clearly named block (batch -> loss -> grads -> grad transforms -> step decision -> optimizer step
// -> step end), which is where the plugin host will attach its hooks.
#pragma once

#include <memory>
#include <string>

#include "core/checkpoint/lineage.h"
#include "core/config/config.h"
#include "core/data/loader.h"
#include "core/parallel/process_groups.h"
#include "core/train/run_dir.h"
#include "core/train/test_fault.h"

namespace keel::checkpoint {
struct TrainingState;
}
namespace keel::train {
struct TrainerState;
struct StepRecord;
class StepReduction;
}  // namespace keel::train

namespace keel::train {

struct TrainSummary {
  int64_t steps_run = 0;
  int64_t last_step = -1;  // index of the last completed step
  double first_loss = 0.0;
  double last_loss = 0.0;
  bool stopped_by_signal = false;
  bool stopped_by_plugin = false;  // a spike handler decided kStop
  std::string metrics_path;
  std::string last_checkpoint;  // directory of the last checkpoint saved by this run ("" if none)
};

class Trainer {
 public:
  // `loader` is opened by the caller before the run dir is claimed, so that unprepared data is reported
  // without leaving a half-made run dir behind.
  // `lineage` says where this run comes from; it is written to RUN_DIR/lineage.json and into every checkpoint.
  // `groups` is this rank's place in the DP x TP x PP job (ProcessGroups::single() for one process): the model
  // gets its TP group and pipeline stage, the gradient reducer and ZeRO-1 the DP group, decisions and
  // checkpoints the world group. Rank 0 alone writes metrics.h5 and lineage.json.
  // `fault` is a test's seam (trainer_state.h: a NaN gradient or a failing save at one rank and step); none by
  // default.
  Trainer(Config config, RunPaths paths, std::unique_ptr<data::DataLoader> loader, checkpoint::Lineage lineage,
          parallel::ProcessGroups groups = parallel::ProcessGroups::single(), TestFault fault = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Continue from a checkpoint's full state (checkpoint::read_full_state: tensors whole, so any layout can cut its
  // shards): weights, optimizer state, RNG, data ledger, tokens seen. Everything is checked
  // (names, shapes, dtypes) before anything is changed; a mismatch throws CheckpointError naming the tensor.
  // Data-ledger changes the config asks for (mixture, skip list) are applied from this step on and recorded in
  // the lineage; with `allow_data_change` a different data fingerprint is accepted (also recorded).
  // Plugins: the optimizer's state is loaded if it is the same plugin, otherwise the new optimizer adopts what it
  // can by name (recorded); other plugins get their state by slot and name, or start fresh (recorded).
  void restore(const checkpoint::TrainingState& state, bool allow_data_change);

  // Runs steps until config.train.steps. Saves checkpoints every checkpoint.every steps and at the end; a
  // SIGINT/SIGTERM finishes the current step, saves a checkpoint and returns (stopped_by_signal). Between steps
  // it carries out rollbacks a spike handler asks for and swap requests left by `keel control` in
  // RUN_DIR/control/.
  TrainSummary train();
  // Saves a checkpoint of the current state (steps completed so far) unless one exists for this step; prunes.
  // Returns its directory.
  std::string save_checkpoint(const std::string& reason);

 private:
  // One step, stage by stage (step_stages.h).
  StepRecord train_step(int64_t step);
  // A rank failed after its step's update (metrics.h5 or train.log not writable, an observer threw): every rank
  // saves a checkpoint of the state after `step` (when it can), records the error, and throws it.
  [[noreturn]] void fail_after_update(int64_t step, const std::string& failure);
  std::unique_ptr<TrainerState> state_;
  std::unique_ptr<StepReduction> reduction_;
};

// Sets up SIGINT/SIGTERM so the trainer stops at the next step boundary; returns whether one arrived.
void install_stop_signal_handlers();
bool stop_requested();

}  // namespace keel::train

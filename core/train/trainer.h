// Why: the readable training loop, llm.c-style: train() -> train_step() -> forward_backward(). Each stage of a
// step is one clearly named block (batch -> loss -> grads -> grad transforms -> step decision -> optimizer step
// -> step end), which is where the plugin host will attach its hooks.
#pragma once

#include <memory>
#include <string>

#include "core/config/config.h"
#include "core/data/loader.h"
#include "core/train/run_dir.h"
#include "core/train/step_context.h"

namespace keel::train {

struct TrainSummary {
  int64_t steps_run = 0;
  int64_t last_step = -1;  // index of the last completed step
  double first_loss = 0.0;
  double last_loss = 0.0;
  bool stopped_by_signal = false;
  std::string metrics_path;
};

class Trainer {
 public:
  // `loader` is opened by the caller before the run dir is claimed, so that unprepared data is reported
  // without leaving a half-made run dir behind.
  Trainer(Config config, RunPaths paths, std::unique_ptr<data::DataLoader> loader);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Runs steps until config.train.steps (or a SIGINT/SIGTERM, which finishes the current step first).
  TrainSummary train();

 private:
  StepContext train_step(int64_t step);
  struct State;
  std::unique_ptr<State> state_;
};

// Sets up SIGINT/SIGTERM so the trainer stops at the next step boundary; returns whether one arrived.
void install_stop_signal_handlers();
bool stop_requested();

}  // namespace keel::train

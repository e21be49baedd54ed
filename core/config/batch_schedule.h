// Why: the global batch of a run may grow during training (batch-size warm-up, `train.batch_schedule =
// "0:8;100:16"`) or change at a resume (`keel resume --set train.grad_accum=...`). The global batch of a step is
// then a function of the step, given by a short list of stages; the config, the data loader (which plans that
// many samples per step and records the list in its ledger) and the trainer (which runs batch / (dp x micro-batch)
// micro-batches per rank) read it from one place. The data order itself does not depend on it: the sample stream
// is a function of the global sample index (docs/data.md "Changing the global batch").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config/config.h"

namespace keel {

// From step `from_step` on (until the next stage), every step trains on `global_batch` sequences.
struct BatchStage {
  int64_t from_step = 0;
  int64_t global_batch = 1;
  std::string origin;  // "train.grad_accum", "train.batch_schedule", "train.grad_accum (adopted at resume)", ...
  bool operator==(const BatchStage& o) const { return from_step == o.from_step && global_batch == o.global_batch; }
};

// "0:8;100:16" -> stages in order. Throws ConfigError naming train.batch_schedule and the bad entry when an entry
// is not STEP:BATCH, a batch is < 1, the first stage is not at step 0 or the steps do not increase.
std::vector<BatchStage> parse_batch_schedule(const std::string& text);
// The config's stages: train.batch_schedule, or one stage of train.micro_batch x train.grad_accum from step 0.
std::vector<BatchStage> batch_stages(const Config& config);
// The global batch of `step` under `stages` (sorted, the first at step 0).
int64_t batch_at(const std::vector<BatchStage>& stages, int64_t step);
// The checks validate() runs on train.batch_schedule: parseable, the batch at step 0 is train.micro_batch x
// train.grad_accum, and every batch divides into parallel.dp x the per-rank micro-batch (Config::rank_micro_batch).
// Throws ConfigError naming the key and the step.
void validate_batch_schedule(const Config& config);

}  // namespace keel

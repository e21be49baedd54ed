// Why: the promise that any batch of any run can be shown again is checked against a record: every step appends
// the samples it trained on to metrics.h5's /data/batch, in the same flush as its /train row (docs/metrics.md).
// This builds those rows on rank 0 (which plans the whole global batch): source index, sample id, epoch, chunk,
// and the documents the sample's window covers, from the prepared data's document index.
#pragma once

#include <vector>

#include "core/metrics/metrics_writer.h"
#include "core/train/trainer_state.h"

namespace keel::train {

// The /data/batch rows of the step in `ctx` (ctx.batch, in slot order), each with its sample's mean loss from
// `sample_losses` (slot order; empty leaves NaN). On first use it loads the document index of the run's data dir
// into `s.documents` and gives the writer the source names; data prepared before the index existed records
// first_doc = -1 (a warning says once how to add it: `keel data prepare` keeps the tokens).
std::vector<metrics::BatchSample> batch_record(TrainerState& s, const sdk::StepContext& ctx,
                                               const std::vector<float>& sample_losses);
// The mean of the samples' losses per source index [0, sources) (/train/source_loss); NaN for a source with no
// sample in `rows`. Every sample has seq_len target tokens, so this is also the token-weighted mean.
std::vector<double> source_losses(const std::vector<metrics::BatchSample>& rows, size_t sources);

}  // namespace keel::train

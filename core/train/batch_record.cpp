// Why: see batch_record.h.
#include "core/train/batch_record.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <limits>

namespace keel::train {

std::vector<metrics::BatchSample> batch_record(TrainerState& s, const sdk::StepContext& ctx,
                                               const std::vector<float>& sample_losses) {
  const data::DataLoader& loader = *s.loader;
  const std::vector<std::string>& names = loader.source_names();
  if (!s.documents) {
    s.documents = std::make_unique<data::DocumentIndex>(loader.dir(), names);
    if (const std::string missing = s.documents->missing(); !missing.empty()) {
      spdlog::warn(
          "{}: no document index for source(s) {} (prepared by an older Keel): /data/batch records first_doc = -1; "
          "`keel data prepare` adds it without changing the tokens",
          loader.dir(), missing);
    }
    s.metrics->set_batch_sources(names);
  }
  const int64_t seq_len = loader.seq_len();
  std::vector<metrics::BatchSample> rows;
  rows.reserve(ctx.batch.size());
  for (size_t slot = 0; slot < ctx.batch.size(); ++slot) {
    const sdk::SampleInfo& sample = ctx.batch[slot];
    const auto source = static_cast<int32_t>(std::find(names.begin(), names.end(), sample.source) - names.begin());
    const data::DocSpan docs = s.documents->span(source, sample.sample_id * seq_len, seq_len + 1);
    rows.push_back({static_cast<int64_t>(slot), source, sample.sample_id, sample.epoch, sample.chunk, docs.first_doc,
                    docs.first_doc_offset, docs.n_docs});
    if (slot < sample_losses.size()) rows.back().loss = sample_losses[slot];
  }
  return rows;
}

std::vector<double> source_losses(const std::vector<metrics::BatchSample>& rows, size_t sources) {
  std::vector<double> sum(sources, 0.0);
  std::vector<int64_t> count(sources, 0);
  for (const metrics::BatchSample& row : rows) {
    if (row.source < 0 || static_cast<size_t>(row.source) >= sources) continue;
    sum[static_cast<size_t>(row.source)] += row.loss;
    ++count[static_cast<size_t>(row.source)];
  }
  std::vector<double> mean(sources, std::numeric_limits<double>::quiet_NaN());
  for (size_t i = 0; i < sources; ++i) {
    if (count[i] > 0) mean[i] = sum[i] / static_cast<double>(count[i]);
  }
  return mean;
}

}  // namespace keel::train

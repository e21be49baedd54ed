// Why: see batch_record.h.
#include "core/train/batch_record.h"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace keel::train {

std::vector<metrics::BatchSample> batch_record(TrainerState& s, const sdk::StepContext& ctx) {
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
  }
  return rows;
}

}  // namespace keel::train

// Why: `keel data show-batch` shows what a step trained on — for an unstarted config (--config: the order is a
// pure function of the config) or for a run as it happened (--run, run_order.h). Both print the same thing per
// step: each sample's source, sample id, epoch, chunk, the documents its window covers and its first tokens, as
// text or as one JSON object per step ({"step": N, "samples": [...]}, docs/data.md).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "core/config/config.h"
#include "core/data/documents.h"
#include "core/data/loader.h"

namespace keel::data {

// Step `plan.step` as JSON: {"step": N, "samples": [{"slot", "source", "sample_id", "epoch", "chunk", "first_doc",
// "first_doc_offset", "n_docs", "docs": [{"doc", "offset", "tokens"}...], "tokens": [first ids]}...]}.
nlohmann::json batch_json(const DataLoader& loader, const DocumentIndex& documents, const BatchPlan& plan,
                          int64_t max_tokens_shown);
// The same as text: a header line, then per sample its slot, source, sample id, epoch, chunk, token range and
// documents, the first `max_tokens_shown` ids and their decoded text (document boundaries as <eos>).
std::string batch_text(const DataLoader& loader, const DocumentIndex& documents, const BatchPlan& plan,
                       int64_t max_tokens_shown);

// Text for `keel data show-batch --config FILE --step N`: the plan of step N of an unstarted run of `config`.
std::string show_batch(const keel::Config& config, int64_t step, int64_t max_tokens_shown);

}  // namespace keel::data

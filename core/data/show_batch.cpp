// Why: see show_batch.h. Token ids are read from the shards; text is decoded piece by piece between EOS tokens so
// that document boundaries stay visible.
#include "core/data/show_batch.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/data/mixture.h"

namespace keel::data {
namespace {

std::string escape_text(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c < 32 || c == 127) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// The documents of a sample's window as {doc, offset (tokens of the document before the window), tokens (of the
// window in it)}; empty without a document index.
nlohmann::json docs_json(const DataLoader& loader, const DocumentIndex& documents, const SampleRef& r) {
  const int64_t begin = r.sample_id * loader.seq_len();
  const int64_t end = begin + loader.seq_len() + 1;
  const DocSpan span = documents.span(r.source, begin, end - begin);
  nlohmann::json out = nlohmann::json::array();
  for (int64_t k = 0; k < span.n_docs; ++k) {
    const int64_t doc = span.first_doc + k;
    const int64_t doc_begin = documents.document_start(r.source, doc);
    const int64_t next = documents.document_start(r.source, doc + 1);
    const int64_t doc_end = next < 0 ? loader.source_tokens(r.source) : next;
    const int64_t from = std::max(begin, doc_begin);
    out.push_back({{"doc", doc}, {"offset", from - doc_begin}, {"tokens", std::min(end, doc_end) - from}});
  }
  return out;
}

std::vector<int32_t> head_tokens(const DataLoader& loader, const SampleRef& r, int64_t max_tokens_shown) {
  const auto tokens = loader.sample_tokens(r.source, r.sample_id);
  const int64_t shown = std::clamp<int64_t>(max_tokens_shown, 0, static_cast<int64_t>(tokens.size()));
  return std::vector<int32_t>(tokens.begin(), tokens.begin() + shown);
}

}  // namespace

nlohmann::json batch_json(const DataLoader& loader, const DocumentIndex& documents, const BatchPlan& plan,
                          int64_t max_tokens_shown) {
  nlohmann::json samples = nlohmann::json::array();
  for (size_t i = 0; i < plan.samples.size(); ++i) {
    const SampleRef& r = plan.samples[i];
    const DocSpan span = documents.span(r.source, r.sample_id * loader.seq_len(), loader.seq_len() + 1);
    samples.push_back({{"slot", i},
                       {"source", loader.source_names().at(r.source)},
                       {"sample_id", r.sample_id},
                       {"epoch", r.epoch},
                       {"chunk", r.chunk},
                       {"first_doc", span.first_doc},
                       {"first_doc_offset", span.first_doc_offset},
                       {"n_docs", span.n_docs},
                       {"docs", docs_json(loader, documents, r)},
                       {"tokens", head_tokens(loader, r, max_tokens_shown)}});
  }
  return {{"step", plan.step}, {"samples", samples}};
}

std::string batch_text(const DataLoader& loader, const DocumentIndex& documents, const BatchPlan& plan,
                       int64_t max_tokens_shown) {
  const auto& names = loader.source_names();
  std::ostringstream out;
  out << "step " << plan.step << ": global batch " << plan.samples.size() << " x " << loader.seq_len() + 1
      << " tokens, weights " << format_weights(loader.weights_at(plan.step), names) << ", first global sample "
      << plan.first_sample << "\n";
  for (size_t i = 0; i < plan.samples.size(); ++i) {
    const SampleRef& r = plan.samples[i];
    const std::vector<int32_t> head = head_tokens(loader, r, max_tokens_shown);
    out << "[" << i << "] source=" << names[r.source] << " sample=" << r.sample_id << " epoch=" << r.epoch
        << " chunk=" << r.chunk << " tokens[" << r.sample_id * loader.seq_len() << ".."
        << r.sample_id * loader.seq_len() + loader.seq_len() + 1 << ")";
    const nlohmann::json docs = docs_json(loader, documents, r);
    if (!docs.empty()) {
      out << " docs";
      for (const auto& d : docs)
        out << " " << d["doc"].get<int64_t>() << "@" << d["offset"].get<int64_t>() << "+" << d["tokens"].get<int64_t>();
    }
    out << "\n    ids:";
    for (int32_t t : head) out << " " << t;
    if (static_cast<int64_t>(head.size()) < loader.seq_len() + 1) out << " ...";
    out << "\n    text: \"";
    try {
      std::vector<int32_t> part;
      for (int32_t t : head) {
        if (t == loader.eos_id()) {
          out << escape_text(loader.decode(part)) << "<eos>";
          part.clear();
        } else {
          part.push_back(t);
        }
      }
      out << escape_text(loader.decode(part)) << "\"\n";
    } catch (const DataError& e) {
      out << "\" (cannot decode: " << e.what() << ")\n";
    }
  }
  return out.str();
}

std::string show_batch(const keel::Config& config, int64_t step, int64_t max_tokens_shown) {
  DataLoader loader(config, config.global_batch());
  const DocumentIndex documents(loader.dir(), loader.source_names());
  loader.seek(step);
  const BatchPlan plan = loader.plan_next();
  return batch_text(loader, documents, plan, max_tokens_shown);
}

}  // namespace keel::data

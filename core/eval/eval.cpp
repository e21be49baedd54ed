// Why: the measurements behind `keel eval` (see eval.h): loading a checkpoint's whole weights into one fp32
// model, per-window NLL, the Analysis360 memorization score, and the report's HDF5 file and console table.
#include "core/eval/eval.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/resharding.h"
#include "core/data/prepare.h"
#include "core/io/file.h"
#include "core/io/hdf5.h"

namespace keel::eval {
namespace {

using checkpoint::CheckpointError;
using checkpoint::DType;
using checkpoint::RawTensor;

template <typename T>
RawTensor raw_vector(DType dtype, const std::vector<T>& values) {
  RawTensor t;
  t.dtype = dtype;
  t.shape = {static_cast<int64_t>(values.size())};
  t.global_shape = t.shape;
  t.offset = {0};
  t.bytes.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}
RawTensor f64(const std::vector<double>& v) { return raw_vector(DType::kFloat64, v); }
RawTensor i64(const std::vector<int64_t>& v) { return raw_vector(DType::kInt64, v); }
RawTensor i32(const std::vector<int32_t>& v) { return raw_vector(DType::kInt32, v); }

// An HDF5 file written by `write_tmp` into a temporary name and put in place atomically (io::write_atomically),
// its directory created. A failure throws std::runtime_error("eval: cannot write PATH: <HDF5's OS error when there
// was one, e.g. No space left on device, else the reason>") and leaves nothing at PATH.
void write_h5_atomically(const std::string& path, const std::function<void(const std::string& tmp)>& write_tmp,
                         io::IfExists if_exists) {
  namespace fs = std::filesystem;
  io::clear_last_os_error();
  try {
    const fs::path parent = fs::path(path).parent_path();
    std::error_code ec;
    if (!parent.empty()) fs::create_directories(parent, ec);
    if (ec) throw io::FileError(path, ec.message());
    io::write_atomically(path, write_tmp, if_exists);
  } catch (const io::FileError& e) {
    std::string reason = io::last_os_error();
    if (reason.empty()) reason = io::one_line(e.reason());
    throw std::runtime_error("eval: cannot write " + path + ": " + reason);
  }
}

}  // namespace

MemorizationScores score_memorization(const std::vector<TrainingSequence>& sequences, const NextTokenFn& next_token,
                                      const MemorizationOptions& options) {
  const int64_t k = options.prompt_tokens, l = options.continuation_tokens;
  if (k < 1 || l < 1 || options.batch < 1) {
    throw std::invalid_argument(
        "memorization: prompt and continuation lengths and batch must be >= 1, got k=" + std::to_string(k) +
        " l=" + std::to_string(l) + " batch=" + std::to_string(options.batch));
  }
  MemorizationScores out;
  std::vector<const TrainingSequence*> usable;
  for (const auto& s : sequences) {
    if (static_cast<int64_t>(s.tokens.size()) < k + l) {
      ++out.skipped_short;
    } else {
      usable.push_back(&s);
    }
  }
  for (size_t begin = 0; begin < usable.size(); begin += static_cast<size_t>(options.batch)) {
    const size_t end = std::min(usable.size(), begin + static_cast<size_t>(options.batch));
    std::vector<std::vector<int32_t>> prefixes;  // N x (k + generated so far)
    for (size_t i = begin; i < end; ++i)
      prefixes.emplace_back(usable[i]->tokens.begin(), usable[i]->tokens.begin() + k);
    std::vector<int64_t> matches(prefixes.size(), 0);
    for (int64_t step = 0; step < l; ++step) {
      const std::vector<int32_t> next = next_token(prefixes);
      if (next.size() != prefixes.size()) {
        throw std::invalid_argument("memorization: next-token function returned " + std::to_string(next.size()) +
                                    " tokens for " + std::to_string(prefixes.size()) + " prefixes");
      }
      for (size_t j = 0; j < prefixes.size(); ++j) {
        if (next[j] == usable[begin + j]->tokens[static_cast<size_t>(k + step)]) ++matches[j];
        prefixes[j].push_back(next[j]);  // greedy: the model continues its own output, right or wrong
      }
    }
    for (size_t j = 0; j < prefixes.size(); ++j) {
      const TrainingSequence& s = *usable[begin + j];
      out.source.push_back(s.source);
      out.sample_id.push_back(s.sample_id);
      out.chunk.push_back(s.chunk);
      out.score.push_back(static_cast<double>(matches[j]) / static_cast<double>(l));
    }
  }
  return out;
}

std::vector<MemorizationSummary> summarize_memorization(const MemorizationScores& scores, int32_t num_sources) {
  struct Sums {
    int64_t n = 0;
    double score = 0.0;
    int64_t extractable = 0;
  };
  std::vector<Sums> per_source(static_cast<size_t>(num_sources));
  std::map<std::pair<int32_t, int64_t>, Sums> per_chunk;
  for (size_t i = 0; i < scores.score.size(); ++i) {
    const int32_t src = scores.source[i];
    if (src < 0 || src >= num_sources)
      throw std::invalid_argument("memorization: source index " + std::to_string(src) + " out of range");
    const bool extractable = scores.score[i] >= 1.0;
    for (Sums* s : {&per_source[static_cast<size_t>(src)], &per_chunk[{src, scores.chunk[i]}]}) {
      ++s->n;
      s->score += scores.score[i];
      s->extractable += extractable ? 1 : 0;
    }
  }
  auto summary = [](int32_t source, int64_t chunk, const Sums& s) {
    MemorizationSummary m;
    m.source = source;
    m.chunk = chunk;
    m.sequences = s.n;
    m.mean_score = s.n ? s.score / static_cast<double>(s.n) : 0.0;
    m.extractable_share = s.n ? static_cast<double>(s.extractable) / static_cast<double>(s.n) : 0.0;
    return m;
  };
  std::vector<MemorizationSummary> out;
  for (int32_t src = 0; src < num_sources; ++src) out.push_back(summary(src, -1, per_source[static_cast<size_t>(src)]));
  for (const auto& [key, sums] : per_chunk) out.push_back(summary(key.first, key.second, sums));
  return out;
}

NextTokenFn greedy_next_token(const model::Llama& model) {
  return [model](const std::vector<std::vector<int32_t>>& prefixes) {
    torch::NoGradGuard no_grad;
    const auto n = static_cast<int64_t>(prefixes.size());
    const auto t = static_cast<int64_t>(prefixes.front().size());
    torch::Tensor tokens = torch::empty({n, t}, torch::kInt64);  // [N, t]
    auto acc = tokens.accessor<int64_t, 2>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < t; ++j) acc[i][j] = prefixes[static_cast<size_t>(i)][static_cast<size_t>(j)];
    }
    const torch::Tensor logits = model->forward(tokens, torch::kFloat32);                          // [N, t, V]
    const torch::Tensor next = logits.select(1, t - 1).argmax(-1).to(torch::kInt64).contiguous();  // [N]
    std::vector<int32_t> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<int32_t>(next[i].item<int64_t>());
    return out;
  };
}

model::Llama load_model(const Config& config, const checkpoint::TrainingState& state,
                        const std::string& checkpoint_dir) {
  model::Llama model(config.model);
  model->eval();
  std::map<std::string, const at::Tensor*> saved;
  for (const auto& [name, tensor] : state.model) saved[name] = &tensor;
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    const auto it = saved.find(item.key());
    if (it == saved.end()) throw CheckpointError(checkpoint_dir + ": model tensor " + item.key() + " is missing");
    if (it->second->sizes() != item.value().sizes()) {
      std::ostringstream message;
      message << checkpoint_dir << ": model tensor " << item.key() << " has shape " << it->second->sizes()
              << ", the model of its config.ini needs " << item.value().sizes();
      throw CheckpointError(message.str());
    }
    item.value().copy_(checkpoint::materialize(*it->second).to(torch::kFloat32));  // read now, one tensor at a time
  }
  return model;
}

std::vector<double> window_nll(const model::Llama& model, const torch::Tensor& windows, int64_t batch) {
  TORCH_CHECK(windows.dim() == 2 && windows.size(1) >= 2, "window_nll: windows must be [N, T+1], got ",
              windows.sizes());
  TORCH_CHECK(batch >= 1, "window_nll: batch must be >= 1");
  torch::NoGradGuard no_grad;
  std::vector<double> out;
  for (int64_t begin = 0; begin < windows.size(0); begin += batch) {
    const torch::Tensor w = windows.slice(0, begin, std::min(windows.size(0), begin + batch));  // [B, T+1]
    const torch::Tensor inputs = w.slice(1, 0, -1), targets = w.slice(1, 1);                    // [B, T]
    const torch::Tensor logits = model->forward(inputs, torch::kFloat32).to(torch::kFloat32);   // [B, T, V]
    const torch::Tensor logp = torch::log_softmax(logits, -1);                                  // [B, T, V]
    const torch::Tensor nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(1);      // [B]
    for (int64_t i = 0; i < nll.size(0); ++i) out.push_back(nll[i].item<double>());
  }
  return out;
}

std::vector<int64_t> eval_sample_ids(uint64_t seed, const std::string& name, int64_t samples, int64_t count) {
  const std::vector<int64_t> order = data::epoch_permutation(seed, name, 0, samples);
  const int64_t take = std::min<int64_t>(std::max<int64_t>(count, 0), samples);
  return std::vector<int64_t>(order.end() - take, order.end());
}

std::vector<data::SampleRef> consumed_samples(data::DataLoader& loader, const std::string& ledger_json) {
  nlohmann::json ledger;
  try {
    ledger = nlohmann::json::parse(ledger_json);
  } catch (const nlohmann::json::exception& e) {
    throw data::DataError(std::string("data ledger: malformed (") + e.what() + ")");
  }
  loader.load_state(ledger);  // mixture history and skip rules of the run; refuses other data
  const int64_t steps = loader.step();
  loader.seek(0);
  std::vector<data::SampleRef> out;
  out.reserve(static_cast<size_t>(steps * loader.global_batch()));
  for (int64_t s = 0; s < steps; ++s) {
    const data::BatchPlan plan = loader.plan_next();
    out.insert(out.end(), plan.samples.begin(), plan.samples.end());
  }
  return out;
}

std::vector<data::SampleRef> pick_memorization_samples(const std::vector<data::SampleRef>& consumed,
                                                       int64_t per_chunk) {
  std::map<std::pair<int32_t, int64_t>, std::vector<data::SampleRef>> groups;
  std::set<std::pair<int32_t, int64_t>> seen;  // (source, sample id): the first time it was consumed counts
  for (const auto& s : consumed) {
    if (seen.insert({s.source, s.sample_id}).second) groups[{s.source, s.chunk}].push_back(s);
  }
  std::vector<data::SampleRef> out;
  for (const auto& [key, group] : groups) {
    const auto n = static_cast<int64_t>(group.size());
    const int64_t take = std::min(n, std::max<int64_t>(per_chunk, 0));
    for (int64_t i = 0; i < take; ++i) out.push_back(group[static_cast<size_t>(i * n / take)]);
  }
  return out;
}

namespace {

void write_report_file(const std::string& path, const EvalReport& r) {
  checkpoint::H5Writer h5(path);
  h5.set_attribute("/", "format", "keel-eval");
  h5.set_attribute("/", "version", int64_t{1});
  h5.set_attribute("/", "checkpoint_dir", r.checkpoint_dir);
  h5.set_attribute("/", "step", r.step);
  h5.set_attribute("/", "split", name_of(r.split));
  nlohmann::json names = r.source_names;
  h5.write_text("/source_names", names.dump());
  for (const auto& p : r.perplexity) {
    const std::string g = "/validation/" + p.source;
    h5.write_tensor(g + "/nll", f64({p.mean_nll}));
    h5.write_tensor(g + "/perplexity", f64({p.perplexity}));
    h5.write_tensor(g + "/tokens", i64({p.tokens}));
    h5.write_tensor(g + "/seen_in_training", i64({p.seen_in_training}));
    h5.write_tensor(g + "/sample_id", i64(p.sample_ids));
    h5.write_tensor(g + "/sample_nll", f64(p.sample_nll));
  }
  const auto& m = r.memorization;
  h5.write_tensor("/memorization/score", f64(m.score));
  h5.write_tensor("/memorization/source", i32(m.source));
  h5.write_tensor("/memorization/sample_id", i64(m.sample_id));
  h5.write_tensor("/memorization/chunk", i64(m.chunk));
  h5.write_tensor("/memorization/skipped_short", i64({m.skipped_short}));
  std::vector<int32_t> s_source;
  std::vector<int64_t> s_chunk, s_sequences;
  std::vector<double> s_mean, s_extractable;
  for (const auto& s : r.memorization_summary) {
    s_source.push_back(s.source);
    s_chunk.push_back(s.chunk);
    s_sequences.push_back(s.sequences);
    s_mean.push_back(s.mean_score);
    s_extractable.push_back(s.extractable_share);
  }
  h5.write_tensor("/memorization/summary/source", i32(s_source));
  h5.write_tensor("/memorization/summary/chunk", i64(s_chunk));
  h5.write_tensor("/memorization/summary/sequences", i64(s_sequences));
  h5.write_tensor("/memorization/summary/mean_score", f64(s_mean));
  h5.write_tensor("/memorization/summary/extractable_share", f64(s_extractable));
  h5.set_attribute("/memorization", "k", r.memorization_options.prompt_tokens);
  h5.set_attribute("/memorization", "l", r.memorization_options.continuation_tokens);
  h5.set_attribute("/", "k", r.memorization_options.prompt_tokens);
  h5.set_attribute("/", "l", r.memorization_options.continuation_tokens);
  h5.close();
}

}  // namespace

void write_report(const std::string& path, const EvalReport& r) {
  namespace fs = std::filesystem;
  if (fs::exists(path))
    throw std::runtime_error(path + ": exists (eval results are written once; remove it or pass another --out)");
  // Linked, not renamed, into place: a file that appeared while evaluating is never replaced.
  write_h5_atomically(
      path, [&](const std::string& tmp) { write_report_file(tmp, r); }, io::IfExists::kKeep);
}

std::string format_report(const EvalReport& r) {
  std::ostringstream out;
  out << "checkpoint " << r.checkpoint_dir << " (step " << r.step << ")\n"
      << "split " << name_of(r.split)
      << (r.split == Split::kHeldout ? " (held-out documents, never trained on)"
                                     : " (the tail of each source's epoch-0 order: see seen_in_training)")
      << "\n\n"
      << std::left << std::setw(16) << "source" << std::right << std::setw(10) << "nll" << std::setw(12) << "perplexity"
      << std::setw(10) << "tokens" << std::setw(18) << "seen_in_training"
      << "\n";
  out << std::fixed;
  for (const auto& p : r.perplexity) {
    out << std::left << std::setw(16) << p.source << std::right << std::setprecision(4) << std::setw(10) << p.mean_nll
        << std::setprecision(2) << std::setw(12) << p.perplexity << std::setw(10) << p.tokens << std::setw(12)
        << p.seen_in_training << " of " << p.sample_ids.size() << "\n";
  }
  out << "\nmemorization (k = " << r.memorization_options.prompt_tokens
      << ", l = " << r.memorization_options.continuation_tokens << "): " << r.memorization.score.size()
      << " sequences, " << r.memorization.skipped_short << " too short\n"
      << std::left << std::setw(16) << "source" << std::right << std::setw(10) << "sequences" << std::setw(12)
      << "mean score" << std::setw(14) << "extractable"
      << "\n";
  for (const auto& s : r.memorization_summary) {
    if (s.chunk != -1) continue;
    out << std::left << std::setw(16) << r.source_names.at(static_cast<size_t>(s.source)) << std::right << std::setw(10)
        << s.sequences << std::setprecision(4) << std::setw(12) << s.mean_score << std::setw(13) << std::setprecision(2)
        << 100.0 * s.extractable_share << "%\n";
  }
  out << "(per chunk: /memorization/summary in the HDF5 file)\n";
  return out.str();
}

Split parse_split(const std::string& name) {
  if (name == "auto") return Split::kAuto;
  if (name == "heldout") return Split::kHeldout;
  if (name == "train-tail") return Split::kTrainTail;
  throw std::invalid_argument("--split must be heldout, train-tail or auto, got '" + name + "'");
}

std::string name_of(Split split) {
  switch (split) {
    case Split::kAuto:
      return "auto";
    case Split::kHeldout:
      return "heldout";
    case Split::kTrainTail:
      return "train-tail";
  }
  return "?";
}

std::vector<std::vector<int32_t>> heldout_windows(const std::string& data_dir, const std::string& source,
                                                  int64_t seq_len, int64_t count) {
  const std::optional<data::HeldoutSet> set = data::read_heldout(data_dir, source, count * seq_len + 1);
  if (!set) {
    throw data::DataError("source " + source + " in " + data_dir + " has no held-out set (source." + source +
                          ".heldout = 0, or data prepared before held-out sets existed): prepare it again, or pass "
                          "--split train-tail");
  }
  const auto available = static_cast<int64_t>(set->head.size());
  const int64_t n = std::min(count, (available - 1) / seq_len);
  if (n < 1) {
    throw data::DataError("source " + source + ": its held-out set has " + std::to_string(set->tokens) +
                          " tokens, fewer than one eval sample (model.seq_len + 1 = " + std::to_string(seq_len + 1) +
                          "): raise source." + source + ".heldout, or pass --split train-tail");
  }
  std::vector<std::vector<int32_t>> out;
  for (int64_t i = 0; i < n; ++i)
    out.emplace_back(set->head.begin() + i * seq_len, set->head.begin() + i * seq_len + seq_len + 1);
  return out;
}

namespace {

// kAuto resolved: the held-out split when every source has a held-out set.
Split resolve_split(Split split, const std::string& data_dir, const std::vector<std::string>& sources) {
  if (split != Split::kAuto) return split;
  for (const auto& name : sources) {
    if (!data::read_heldout(data_dir, name, 0)) {
      spdlog::warn(
          "eval: source {} in {} has no held-out set: evaluating on the train-tail split (samples "
          "training may have consumed; see seen_in_training)",
          name, data_dir);
      return Split::kTrainTail;
    }
  }
  return Split::kHeldout;
}

// The eval windows of source `src`: [N, T+1] token ids, and their ids (held-out window index, or sample id).
torch::Tensor eval_windows(const Config& config, const data::DataLoader& loader, int32_t src, Split split,
                           int64_t count, SourcePerplexity& p) {
  std::vector<std::vector<int32_t>> rows;
  if (split == Split::kHeldout) {
    rows = heldout_windows(config.data.dir, p.source, loader.seq_len(), count);
    for (size_t i = 0; i < rows.size(); ++i) p.sample_ids.push_back(static_cast<int64_t>(i));
  } else {
    p.sample_ids = eval_sample_ids(config.data.seed, p.source, loader.samples_per_epoch(src), count);
    for (int64_t id : p.sample_ids) rows.push_back(loader.sample_tokens(src, id));
  }
  const auto n = static_cast<int64_t>(rows.size());
  torch::Tensor windows = torch::empty({n, loader.seq_len() + 1}, torch::kInt64);  // [N, T+1]
  for (int64_t i = 0; i < n; ++i) {
    const auto& tokens = rows[static_cast<size_t>(i)];
    windows[i].copy_(torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.end()), torch::kInt64));
  }
  return windows;
}

}  // namespace

EvalReport evaluate_checkpoint(const Config& config, const checkpoint::TrainingState& state,
                               const std::string& checkpoint_dir, int64_t step, const EvalOptions& options) {
  const model::Llama model = load_model(config, state, checkpoint_dir);
  data::DataLoader loader(config, config.global_batch());
  const std::vector<data::SampleRef> consumed = consumed_samples(loader, state.data_ledger);

  EvalReport report;
  report.checkpoint_dir = checkpoint_dir;
  report.step = step;
  report.source_names = loader.source_names();
  report.split = resolve_split(options.split, config.data.dir, report.source_names);

  // 1. Per-source NLL / perplexity on the eval samples.
  const int64_t batch = config.train.micro_batch;
  for (int32_t src = 0; src < static_cast<int32_t>(report.source_names.size()); ++src) {
    SourcePerplexity p;
    p.source = report.source_names[static_cast<size_t>(src)];
    const torch::Tensor windows = eval_windows(config, loader, src, report.split, options.batches * batch, p);
    const int64_t n = windows.size(0);
    p.sample_nll = window_nll(model, windows, batch);
    double sum = 0.0;
    for (double v : p.sample_nll) sum += v;
    p.tokens = n * loader.seq_len();
    p.mean_nll = n ? sum / static_cast<double>(n) : 0.0;  // every window has T targets: token-weighted
    p.perplexity = std::exp(p.mean_nll);
    if (report.split == Split::kTrainTail) {  // held-out windows are never in the training stream
      std::set<int64_t> trained_on;           // this source's sample ids the checkpoint consumed
      for (const auto& s : consumed) {
        if (s.source == src) trained_on.insert(s.sample_id);
      }
      for (int64_t id : p.sample_ids) p.seen_in_training += trained_on.count(id) ? 1 : 0;
    }
    report.perplexity.push_back(std::move(p));
  }

  // 2. Memorization on consumed training sequences.
  std::vector<TrainingSequence> sequences;
  for (const auto& s : pick_memorization_samples(consumed, options.memorization_samples)) {
    sequences.push_back({s.source, s.sample_id, s.chunk, loader.sample_tokens(s.source, s.sample_id)});
  }
  report.memorization_options.batch = batch;
  report.memorization = score_memorization(sequences, greedy_next_token(model), report.memorization_options);
  report.memorization_summary =
      summarize_memorization(report.memorization, static_cast<int32_t>(report.source_names.size()));
  return report;
}

namespace {

// Per source of one checkpoint: its nll, perplexity, tokens, samples and seen_in_training (--json, both forms).
nlohmann::json sources_json(const EvalReport& r) {
  nlohmann::json sources = nlohmann::json::object();
  for (const auto& p : r.perplexity) {
    sources[p.source] = {{"nll", p.mean_nll},
                         {"perplexity", p.perplexity},
                         {"tokens", p.tokens},
                         {"samples", p.sample_ids.size()},
                         {"seen_in_training", p.seen_in_training}};
  }
  return sources;
}

}  // namespace

nlohmann::json report_json(const EvalReport& r, const std::string& out_path) {
  const nlohmann::json sources = sources_json(r);
  nlohmann::json per_source = nlohmann::json::object();
  nlohmann::json per_chunk = nlohmann::json::array();
  for (const auto& s : r.memorization_summary) {
    const std::string& name = r.source_names.at(static_cast<size_t>(s.source));
    const nlohmann::json row = {
        {"sequences", s.sequences}, {"mean_score", s.mean_score}, {"extractable_share", s.extractable_share}};
    if (s.chunk == -1) {
      per_source[name] = row;
    } else {
      nlohmann::json chunk_row = row;
      chunk_row["source"] = name;
      chunk_row["chunk"] = s.chunk;
      per_chunk.push_back(chunk_row);
    }
  }
  return {{"checkpoint", r.checkpoint_dir},
          {"step", r.step},
          {"split", name_of(r.split)},
          {"out", out_path},
          {"sources", sources},
          {"memorization",
           {{"prompt_tokens", r.memorization_options.prompt_tokens},
            {"continuation_tokens", r.memorization_options.continuation_tokens},
            {"sequences", r.memorization.score.size()},
            {"skipped_short", r.memorization.skipped_short},
            {"sources", per_source},
            {"chunks", per_chunk}}}};
}

namespace {

// Per checkpoint: source index -> its memorization summary (chunk -1).
const MemorizationSummary* source_summary(const EvalReport& r, size_t src) {
  for (const auto& m : r.memorization_summary)
    if (m.chunk == -1 && m.source == static_cast<int32_t>(src)) return &m;
  return nullptr;
}

void write_curve_file(const std::string& path, const std::string& run_dir, const std::vector<EvalReport>& reports) {
  checkpoint::H5Writer h5(path);
  h5.set_attribute("/", "format", "keel-eval-curve");
  h5.set_attribute("/", "version", int64_t{1});
  h5.set_attribute("/", "run_dir", run_dir);
  h5.set_attribute("/", "split", name_of(reports.front().split));
  const std::vector<std::string>& names = reports.front().source_names;
  h5.write_text("/source_names", nlohmann::json(names).dump());
  std::vector<int64_t> steps;
  nlohmann::json dirs = nlohmann::json::array();
  for (const auto& r : reports) {
    steps.push_back(r.step);
    dirs.push_back(r.checkpoint_dir);
  }
  h5.write_tensor("/step", i64(steps));
  h5.write_text("/checkpoint_dirs", dirs.dump());
  for (size_t src = 0; src < names.size(); ++src) {
    std::vector<double> nll, ppl, mem;
    std::vector<int64_t> tokens, seen, mem_n;
    for (const auto& r : reports) {
      const SourcePerplexity& p = r.perplexity.at(src);
      nll.push_back(p.mean_nll);
      ppl.push_back(p.perplexity);
      tokens.push_back(p.tokens);
      seen.push_back(p.seen_in_training);
      const MemorizationSummary* m = source_summary(r, src);
      mem.push_back(m ? m->mean_score : 0.0);
      mem_n.push_back(m ? m->sequences : 0);
    }
    const std::string g = "/validation/" + names[src];
    h5.write_tensor(g + "/nll", f64(nll));
    h5.write_tensor(g + "/perplexity", f64(ppl));
    h5.write_tensor(g + "/tokens", i64(tokens));
    h5.write_tensor(g + "/seen_in_training", i64(seen));
    h5.write_tensor("/memorization/" + names[src] + "/mean_score", f64(mem));
    h5.write_tensor("/memorization/" + names[src] + "/sequences", i64(mem_n));
  }
  h5.close();
}

}  // namespace

void write_curve(const std::string& path, const std::string& run_dir, const std::vector<EvalReport>& reports) {
  if (reports.empty()) throw std::runtime_error("eval: " + run_dir + ": no checkpoint to write a curve of");
  for (const auto& r : reports) {
    if (r.source_names != reports.front().source_names || r.split != reports.front().split)
      throw std::runtime_error("eval: " + r.checkpoint_dir + ": other sources or split than " +
                               reports.front().checkpoint_dir + ": one curve cannot hold both");
  }
  write_h5_atomically(
      path, [&](const std::string& tmp) { write_curve_file(tmp, run_dir, reports); }, io::IfExists::kReplace);
}

nlohmann::json curve_json(const std::string& run_dir, const std::vector<EvalReport>& reports,
                          const std::string& out_path) {
  nlohmann::json checkpoints = nlohmann::json::array();
  for (const auto& r : reports) {
    checkpoints.push_back({{"step", r.step}, {"checkpoint", r.checkpoint_dir}, {"sources", sources_json(r)}});
  }
  return {{"run", run_dir},
          {"out", out_path},
          {"split", reports.empty() ? std::string("auto") : name_of(reports.front().split)},
          {"checkpoints", checkpoints}};
}

}  // namespace keel::eval

// Why: `keel forensics RUN --step N` answers "which samples made step N spike, and what is the least to skip?". It
// replays steps C..N from the newest valid checkpoint at or before N (C) as a child `keel resume` into a scratch
// dir (through `keel launch` in the checkpoint's layout when it had several ranks), saving the state before step N,
// and says whether the replay reproduced the logged loss and grad norm bit for bit (`replay_matches`). Then, in this
// process, it loads that state as one fp32-master model (any layout, through the resharding reader), gives every
// sample of step N's batch its own forward and backward (core/forensics/attribution.h), ranks the samples by their
// share of the step's gradient norm, aggregates per source and per chunk, searches the smallest set of samples
// whose removal brings the step within the spike detector's threshold, and writes OUT/step-N.h5 (atomically) and
// OUT/step-N.skip, a skip list for `keel resume --skip-list`. Exit 0 done; 2 bad input or a failed replay, naming
// the file or step. docs/forensics.md.
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/resharding.h"
#include "core/cli/commands/commands.h"
#include "core/cli/commands/common.h"
#include "core/data/loader.h"
#include "core/eval/eval.h"
#include "core/forensics/attribution.h"
#include "core/forensics/child_process.h"
#include "core/forensics/replay_check.h"
#include "core/io/file.h"
#include "core/metrics/metrics_reader.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct ForensicsOptions {
  std::string run, from, out, scratch;
  int64_t step = -1;
  int64_t max_memory_mb = 4096;
  forensics::ThresholdOptions threshold;
  bool json = false, keep = false;
};

// A usage error: exit 2 with its message.
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Start {
  std::string dir;
  int64_t step = 0;
};

// --from, else the newest valid checkpoint of RUN at or before step N.
Start choose_checkpoint(const ForensicsOptions& o) {
  if (!o.from.empty()) {
    const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(o.from);
    for (const auto& warning : ckpt.warnings) std::cerr << "keel forensics: warning: " << warning << "\n";
    if (ckpt.manifest.step > o.step)
      throw BadInput("--from " + ckpt.dir + " is at step " + std::to_string(ckpt.manifest.step) + ", after step " +
                     std::to_string(o.step) + ": give a checkpoint at or before it");
    return {ckpt.dir, ckpt.manifest.step};
  }
  Start start;
  for (const auto& e : checkpoint::CheckpointStore(o.run + "/checkpoints").list_valid()) {
    if (e.step <= o.step) start = {e.dir, e.step};
  }
  if (start.dir.empty())
    throw BadInput(o.run + " has no valid checkpoint at or before step " + std::to_string(o.step) +
                   " (give --from CKPT)");
  return start;
}

struct Replay {
  std::string state_dir;  // the checkpoint holding the state before step N
  std::string run_dir;    // the replay's run dir
  std::optional<forensics::Mismatch> mismatch;
  forensics::LoggedStep step;  // the replayed row of step N
};

// `keel resume` of the start checkpoint for steps C..N, saving the state before step N (checkpoint.every = N saves
// after step N-1 and at no other step of the replay), the LR schedule's length pinned, in the checkpoint's layout.
Replay replay(const ForensicsOptions& o, const Start& start, const forensics::LoggedRun& logged,
              const std::string& scratch) {
  const Config config = load_config(start.dir + "/config.ini");
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  Replay r;
  r.run_dir = scratch + "/run";
  std::vector<std::string> argv{self};
  const int64_t world = config.parallel.dp * config.parallel.tp * config.parallel.pp;
  if (world > 1) argv.insert(argv.end(), {"launch", "--nproc", std::to_string(world), "--", self});
  argv.insert(argv.end(), {"resume", "--from", start.dir, "--run-dir", r.run_dir});
  const bool save = start.step < o.step;
  for (const std::string& s :
       {"train.steps=" + std::to_string(o.step + 1), "optim.decay_steps=" + std::to_string(config.lr_decay_steps()),
        "checkpoint.every=" + std::to_string(save ? o.step : 0), std::string("checkpoint.at_end=false"),
        std::string("checkpoint.keep_last=0")})
    argv.insert(argv.end(), {"--set", s});
  const std::string log = scratch + "/replay.log";
  const int rc = forensics::run_child(argv, log, "the replay");
  if (rc != 0)
    throw std::runtime_error("the replay (keel resume from " + start.dir + ") failed with exit " + std::to_string(rc) +
                             "; its log " + log + " ends:" + forensics::last_lines(log, 5));
  const forensics::LoggedRun replayed = forensics::read_logged_run(r.run_dir + "/metrics.h5");
  for (int64_t s = start.step; s <= o.step && !r.mismatch; ++s) {
    const auto it = replayed.steps.find(s), want = logged.steps.find(s);
    if (it == replayed.steps.end()) {
      r.mismatch = forensics::Mismatch{s, "step missing in the replay", "logged", "absent"};
    } else if (want != logged.steps.end()) {
      r.mismatch = forensics::compare_step(want->second, it->second, logged.tensor_names);
    }
  }
  if (replayed.steps.count(o.step)) r.step = replayed.steps.at(o.step);
  r.state_dir = start.dir;
  if (save) {
    r.state_dir.clear();
    for (const auto& e : checkpoint::CheckpointStore(r.run_dir + "/checkpoints").list_valid()) {
      if (e.step == o.step) r.state_dir = e.dir;
    }
    if (r.state_dir.empty())
      throw std::runtime_error("the replay in " + r.run_dir + " saved no checkpoint at step " + std::to_string(o.step));
  }
  return r;
}

// Step N's batch as /data/batch recorded it (its last block when the step ran twice), with the logged losses.
struct Batch {
  std::vector<forensics::BatchSample> samples;
  std::vector<double> logged_loss;
  std::vector<std::string> sources;
};

Batch logged_batch(const std::string& metrics_h5, int64_t step, const forensics::LoggedRun& logged) {
  const metrics::MetricsReader reader(metrics_h5);
  if (!reader.has_dataset("/data/batch"))
    throw BadInput(metrics_h5 + " has no /data/batch: the run did not record its batches");
  Batch b;
  b.sources = reader.batch_sources();
  const auto rows = reader.read_batches_by_step();
  const auto it = rows.find(step);
  if (it == rows.end()) throw BadInput(metrics_h5 + " recorded no batch of step " + std::to_string(step));
  for (const auto& row : it->second) {
    if (!b.samples.empty() && row.slot <= b.samples.back().slot) b.samples.clear();  // a later run of the step
    b.samples.push_back({row.slot, static_cast<int32_t>(row.source), row.sample_id, row.epoch, row.chunk});
  }
  const auto& losses = logged.steps.at(step).sample_losses;
  if (losses.size() == b.samples.size()) b.logged_loss.assign(losses.begin(), losses.end());
  return b;
}

template <typename T>
checkpoint::RawTensor raw(checkpoint::DType dtype, const std::vector<T>& v) {
  checkpoint::RawTensor t;
  t.dtype = dtype;
  t.shape = t.global_shape = {static_cast<int64_t>(v.size())};
  t.offset = {0};
  t.bytes.resize(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}
checkpoint::RawTensor f64(const std::vector<double>& v) { return raw(checkpoint::DType::kFloat64, v); }
checkpoint::RawTensor i64(const std::vector<int64_t>& v) { return raw(checkpoint::DType::kInt64, v); }

// Everything the command found, in the form the outputs need.
struct Findings {
  int64_t step = 0;
  std::string checkpoint;
  Replay replay;
  forensics::LoggedStep logged;
  forensics::Threshold threshold;
  Batch batch;
  forensics::SampleGradients grads;
  forensics::SearchResult search;
  std::vector<int64_t> ranked;  // slots, best first
  std::vector<std::string> skip;
  double replay_seconds = 0.0, attribution_seconds = 0.0;
};

// One table: rows of (key, member values), written as columns under `group`.
struct Aggregate {
  int32_t source = 0;
  int64_t chunk = -1, samples = 0, removed = 0;
  double loss = 0.0, share = 0.0;
};

std::vector<Aggregate> aggregate(const Findings& f, bool by_chunk) {
  std::map<std::pair<int32_t, int64_t>, Aggregate> groups;
  for (size_t i = 0; i < f.batch.samples.size(); ++i) {
    const auto& s = f.batch.samples[i];
    Aggregate& a = groups[{s.source, by_chunk ? s.chunk : -1}];
    a.source = s.source;
    a.chunk = by_chunk ? s.chunk : -1;
    ++a.samples;
    a.loss += f.grads.loss[i];
    a.share += f.grads.grad_share(static_cast<int64_t>(i));
    a.removed += std::count(f.search.removed.begin(), f.search.removed.end(), static_cast<int64_t>(i));
  }
  std::vector<Aggregate> out;
  for (auto& [key, a] : groups) {
    a.loss /= static_cast<double>(a.samples);
    out.push_back(a);
  }
  return out;
}

void write_aggregates(checkpoint::H5Writer& h5, const std::string& group, const std::vector<Aggregate>& rows) {
  std::vector<int64_t> source, chunk, samples, removed;
  std::vector<double> loss, share;
  for (const auto& a : rows) {
    source.push_back(a.source), chunk.push_back(a.chunk), samples.push_back(a.samples), removed.push_back(a.removed);
    loss.push_back(a.loss), share.push_back(a.share);
  }
  h5.write_tensor(group + "/source", i64(source));
  if (group == "/chunks") h5.write_tensor(group + "/chunk", i64(chunk));
  h5.write_tensor(group + "/samples", i64(samples));
  h5.write_tensor(group + "/removed", i64(removed));
  h5.write_tensor(group + "/mean_loss", f64(loss));
  h5.write_tensor(group + "/grad_share", f64(share));
}

void write_h5(const std::string& path, const Findings& f) {
  io::write_atomically(path, [&](const std::string& tmp) {
    checkpoint::H5Writer h5(tmp);
    h5.set_attribute("/", "format", "keel-forensics");
    h5.set_attribute("/", "version", int64_t{1});
    h5.set_attribute("/", "step", f.step);
    h5.set_attribute("/", "checkpoint", f.checkpoint);
    h5.set_attribute("/", "replay_matches", int64_t{f.replay.mismatch ? 0 : 1});
    h5.set_attribute("/", "threshold_rule", f.threshold.rule);
    h5.set_attribute("/", "search_method", f.search.method);
    h5.write_text("/source_names", json(f.batch.sources).dump());
    std::vector<int64_t> slot, source, sample_id, epoch, chunk, rank(f.batch.samples.size()), removed;
    std::vector<double> loss, grad_norm, share;
    for (size_t i = 0; i < f.batch.samples.size(); ++i) {
      const auto& s = f.batch.samples[i];
      slot.push_back(s.slot), source.push_back(s.source), sample_id.push_back(s.sample_id);
      epoch.push_back(s.epoch), chunk.push_back(s.chunk);
      loss.push_back(f.grads.loss[i]);
      grad_norm.push_back(f.grads.grad_norm(static_cast<int64_t>(i)));
      share.push_back(f.grads.grad_share(static_cast<int64_t>(i)));
      removed.push_back(std::count(f.search.removed.begin(), f.search.removed.end(), static_cast<int64_t>(i)));
    }
    for (size_t r = 0; r < f.ranked.size(); ++r) rank[static_cast<size_t>(f.ranked[r])] = static_cast<int64_t>(r);
    h5.write_tensor("/samples/slot", i64(slot));
    h5.write_tensor("/samples/source", i64(source));
    h5.write_tensor("/samples/sample_id", i64(sample_id));
    h5.write_tensor("/samples/epoch", i64(epoch));
    h5.write_tensor("/samples/chunk", i64(chunk));
    h5.write_tensor("/samples/loss", f64(loss));
    if (!f.batch.logged_loss.empty()) h5.write_tensor("/samples/logged_loss", f64(f.batch.logged_loss));
    h5.write_tensor("/samples/grad_norm", f64(grad_norm));
    h5.write_tensor("/samples/grad_share", f64(share));
    h5.write_tensor("/samples/rank", i64(rank));
    h5.write_tensor("/samples/removed", i64(removed));
    write_aggregates(h5, "/sources", aggregate(f, false));
    write_aggregates(h5, "/chunks", aggregate(f, true));
    std::vector<int64_t> trace_slot;
    std::vector<double> trace_loss, trace_norm;
    for (const auto& t : f.search.trace) {
      trace_slot.push_back(t.removed), trace_loss.push_back(t.loss), trace_norm.push_back(t.grad_norm);
    }
    h5.write_tensor("/search/removed_slot", i64(trace_slot));
    h5.write_tensor("/search/loss", f64(trace_loss));
    h5.write_tensor("/search/grad_norm", f64(trace_norm));
    h5.write_tensor("/step/logged", f64({f.logged.loss, f.logged.grad_norm}));
    h5.write_tensor("/step/replayed", f64({f.replay.step.loss, f.replay.step.grad_norm}));
    h5.write_tensor("/step/attributed", f64({f.grads.subset_loss({}), f.grads.batch_grad_norm()}));
    h5.write_tensor("/step/threshold", f64({f.threshold.max_loss, f.threshold.max_grad_norm}));
    h5.close();
  });
}

void write_skip(const std::string& path, const Findings& f, const std::string& run) {
  std::string text =
      "# keel forensics " + run + " --step " + std::to_string(f.step) + ": " +
      (f.search.reached ? std::to_string(f.search.removed.size()) + " sample(s) to remove (" + f.search.method + ")"
                        : "no removal set found (" + f.search.method + ")") +
      "\n# threshold: " + f.threshold.rule + "\n# use: keel resume --from CKPT --run-dir NEW --skip-list " + path +
      "\n";
  for (const auto& spec : f.skip) text += spec + "\n";
  io::write_file_atomically(path, text);
}

json sample_json(const Findings& f, int64_t i) {
  const auto& s = f.batch.samples[static_cast<size_t>(i)];
  const auto& names = f.batch.sources;
  json j{{"source", static_cast<size_t>(s.source) < names.size() ? names[static_cast<size_t>(s.source)] : "?"},
         {"sample_id", s.sample_id},
         {"loss", f.grads.loss[static_cast<size_t>(i)]},
         {"grad_norm", f.grads.grad_norm(i)},
         {"grad_share", f.grads.grad_share(i)},
         {"slot", s.slot},
         {"epoch", s.epoch},
         {"chunk", s.chunk},
         {"removed", std::count(f.search.removed.begin(), f.search.removed.end(), i) > 0}};
  if (!f.batch.logged_loss.empty()) j["logged_loss"] = f.batch.logged_loss[static_cast<size_t>(i)];
  return j;
}

json findings_json(const Findings& f, const std::string& h5, const std::string& skip) {
  json samples = json::array();
  for (int64_t i : f.ranked) samples.push_back(sample_json(f, i));
  json sources = json::array(), chunks = json::array();
  for (const auto& a : aggregate(f, false))
    sources.push_back({{"source", f.batch.sources.at(static_cast<size_t>(a.source))},
                       {"samples", a.samples},
                       {"removed", a.removed},
                       {"mean_loss", a.loss},
                       {"grad_share", a.share}});
  for (const auto& a : aggregate(f, true))
    chunks.push_back({{"source", f.batch.sources.at(static_cast<size_t>(a.source))},
                      {"chunk", a.chunk},
                      {"samples", a.samples},
                      {"removed", a.removed},
                      {"mean_loss", a.loss},
                      {"grad_share", a.share}});
  json mismatch = nullptr;
  if (f.replay.mismatch)
    mismatch = {{"step", f.replay.mismatch->step},
                {"what", f.replay.mismatch->what},
                {"logged", f.replay.mismatch->logged},
                {"replayed", f.replay.mismatch->replayed}};
  const forensics::SearchStep& end = f.search.trace.back();
  return {
      {"step", f.step},
      {"replay_matches", !f.replay.mismatch},
      {"samples", samples},
      {"skip_list", skip},
      {"skip_rules", f.skip},
      {"out", h5},
      {"checkpoint", f.checkpoint},
      {"first_mismatch", mismatch},
      {"logged", {{"loss", f.logged.loss}, {"grad_norm", f.logged.grad_norm}}},
      {"replayed", {{"loss", f.replay.step.loss}, {"grad_norm", f.replay.step.grad_norm}}},
      {"attributed", {{"loss", f.grads.subset_loss({})}, {"grad_norm", f.grads.batch_grad_norm()}}},
      {"threshold",
       {{"max_loss", f.threshold.max_loss}, {"max_grad_norm", f.threshold.max_grad_norm}, {"rule", f.threshold.rule}}},
      {"search",
       {{"reached", f.search.reached},
        {"within_at_start", f.search.within_at_start},
        {"method", f.search.method},
        {"removed", f.search.removed.size()},
        {"loss_after", end.loss},
        {"grad_norm_after", end.grad_norm}}},
      {"sources", sources},
      {"chunks", chunks},
      {"cost",
       {{"samples", f.grads.samples},
        {"parameters", f.grads.parameters},
        {"replay_seconds", f.replay_seconds},
        {"attribution_seconds", f.attribution_seconds}}}};
}

void print_text(const Findings& f, const std::string& h5, const std::string& skip) {
  std::cout << "keel forensics: step " << f.step << " replayed from " << f.checkpoint << ": "
            << (f.replay.mismatch ? "DIFFERS from the log (" + forensics::describe(*f.replay.mismatch) + ")"
                                  : std::string("loss and grad norm bit-identical to the log"))
            << "\n  logged loss " << f.logged.loss << ", grad norm " << f.logged.grad_norm
            << "; threshold loss <= " << f.threshold.max_loss << ", grad norm <= " << f.threshold.max_grad_norm << " ("
            << f.threshold.rule << ")\n  rank source sample_id chunk loss grad_norm grad_share removed\n";
  for (size_t r = 0; r < f.ranked.size(); ++r) {
    const json j = sample_json(f, f.ranked[r]);
    std::cout << "  " << r << " " << j["source"].get<std::string>() << " " << j["sample_id"] << " " << j["chunk"] << " "
              << j["loss"] << " " << j["grad_norm"] << " " << j["grad_share"] << " "
              << (j["removed"].get<bool>() ? "yes" : "") << "\n";
  }
  const auto& end = f.search.trace.back();
  std::cout << "  search (" << f.search.method << "): " << f.search.removed.size() << " sample(s) removed -> loss "
            << end.loss << ", grad norm " << end.grad_norm << "\n  wrote " << h5 << " and " << skip << "\n";
}

// The attribution of step N from the replayed state (this process, one fp32-master model).
void attribute(const ForensicsOptions& o, Findings& f) {
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(f.replay.state_dir);
  const Config config = load_config(ckpt.dir + "/config.ini");
  if (config.train.threads > 0) torch::set_num_threads(static_cast<int>(config.train.threads));
  data::DataLoader loader(config, config.global_batch());
  if (loader.source_names() != f.batch.sources)
    throw BadInput(o.run + "/metrics.h5 names the sources differently from the data in " + loader.dir());
  std::vector<int64_t> ids;  // [B, T+1]
  for (const auto& s : f.batch.samples) {
    for (int32_t t : loader.sample_tokens(s.source, s.sample_id)) ids.push_back(t);
  }
  const auto B = static_cast<int64_t>(f.batch.samples.size());
  const torch::Tensor windows = torch::tensor(ids, torch::kInt64).reshape({B, -1});
  const checkpoint::TrainingState state = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1);
  const model::Llama model = eval::load_model(config, state, ckpt.dir);
  const auto dtype = config.train.precision == Precision::kBf16Mixed ? torch::kBFloat16 : torch::kFloat32;
  f.grads = forensics::per_sample_gradients(model, windows, dtype, o.max_memory_mb << 20);
  f.search = forensics::search_removal(f.grads, f.threshold.max_loss, f.threshold.max_grad_norm);
  for (int64_t i = 0; i < B; ++i) f.ranked.push_back(i);
  std::stable_sort(f.ranked.begin(), f.ranked.end(),
                   [&](int64_t a, int64_t b) { return f.grads.grad_share(a) > f.grads.grad_share(b); });
  f.skip = forensics::skip_specs(f.batch.samples, f.search.removed, f.batch.sources);
}

std::string make_scratch(const ForensicsOptions& o) {
  if (!o.scratch.empty()) {
    if (fs::exists(o.scratch) && !fs::is_empty(o.scratch))
      throw BadInput("--scratch " + o.scratch + " exists and is not empty");
    fs::create_directories(o.scratch);
    return o.scratch;
  }
  std::string pattern = (fs::temp_directory_path() / "keel-forensics-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("cannot create a scratch dir " + pattern);
  return pattern;
}

int run_forensics(const ForensicsOptions& o) {
  const std::string metrics_h5 = o.run + "/metrics.h5";
  if (!fs::exists(metrics_h5)) throw BadInput(metrics_h5 + ": no such file (not a Keel run dir?)");
  const forensics::LoggedRun logged = forensics::read_logged_run(metrics_h5);
  if (!logged.steps.count(o.step))
    throw BadInput(metrics_h5 + " logged no step " + std::to_string(o.step) + " (logged steps " +
                   (logged.steps.empty() ? std::string("none")
                                         : std::to_string(logged.steps.begin()->first) + ".." +
                                               std::to_string(logged.steps.rbegin()->first)) +
                   ")");
  Findings f;
  f.step = o.step;
  f.logged = logged.steps.at(o.step);
  const Start start = choose_checkpoint(o);
  f.checkpoint = start.dir;
  f.threshold = forensics::spike_threshold(logged, o.step, o.threshold);
  if (!f.threshold.defined)
    throw BadInput("step " + std::to_string(o.step) + " has " + std::to_string(f.threshold.history) +
                   " logged non-spike steps before it, fewer than --min-history " +
                   std::to_string(o.threshold.min_history) + ": give --min-history, --max-loss or --max-grad-norm");
  f.batch = logged_batch(metrics_h5, o.step, logged);
  const std::string scratch = make_scratch(o);
  const auto t0 = std::chrono::steady_clock::now();
  f.replay = replay(o, start, logged, scratch);
  const auto t1 = std::chrono::steady_clock::now();
  attribute(o, f);
  f.replay_seconds = std::chrono::duration<double>(t1 - t0).count();
  f.attribution_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  const std::string out = o.out.empty() ? o.run + "/forensics" : o.out;
  fs::create_directories(out);
  const std::string h5 = out + "/step-" + std::to_string(o.step) + ".h5";
  const std::string skip = out + "/step-" + std::to_string(o.step) + ".skip";
  write_h5(h5, f);
  write_skip(skip, f, o.run);
  if (o.keep || f.replay.mismatch) {
    std::cerr << "keel forensics: the replay is in " << f.replay.run_dir << "\n";
  } else {
    fs::remove_all(scratch);
  }
  if (o.json) {
    print_json(findings_json(f, h5, skip));
  } else {
    print_text(f, h5, skip);
  }
  return 0;
}

}  // namespace

int cmd_forensics(const Args& args) {
  ForensicsOptions o;
  std::vector<std::string> positional;
  double max_loss = 0.0, max_grad_norm = 0.0;
  po::options_description options("keel forensics RUN_DIR --step N");
  // clang-format off
  options.add_options()
      ("step", po::value<int64_t>(&o.step), "the logged step to replay and attribute (required)")
      ("from", po::value<std::string>(&o.from),
       "checkpoint dir to replay from (default: the newest valid one of RUN_DIR at or before step N)")
      ("out", po::value<std::string>(&o.out), "where step-N.h5 and step-N.skip go (default: RUN_DIR/forensics)")
      ("zscore", po::value<double>(&o.threshold.z), "the detector's z-score threshold (default 6, zscore_skip's)")
      ("window", po::value<int64_t>(&o.threshold.window), "its window of non-spike steps (default 50)")
      ("min-history", po::value<int64_t>(&o.threshold.min_history), "values it needs before it judges (default 10)")
      ("max-loss", po::value<double>(&max_loss), "an explicit loss threshold (replaces the z-score's)")
      ("max-grad-norm", po::value<double>(&max_grad_norm), "an explicit grad norm threshold (replaces the z-score's)")
      ("max-memory-mb", po::value<int64_t>(&o.max_memory_mb),
       "cap on the per-sample gradients held at once, B x P x 4 bytes (default 4096)")
      ("scratch", po::value<std::string>(&o.scratch), "directory for the replay (default: a new temp dir)")
      ("keep", "keep the replay's directory (kept anyway when it differs from the log)")
      ("json", "print one JSON object")
      ("help", "show this help");
  // clang-format on
  auto vm = parse_args(args, options, "forensics", &positional);
  if (vm.count("help")) {
    std::cout << "usage: keel forensics RUN_DIR --step N [--from CKPT] [--out DIR] [--json]\n"
                 "Replays step N from a checkpoint (bit-exact: says whether loss and grad norm equal the logged "
                 "ones), attributes its loss and gradient norm to its samples, sources and chunks, and finds the "
                 "smallest set of samples whose removal brings the step within the spike detector's threshold: "
                 "RUN_DIR/forensics/step-N.h5 and step-N.skip (for keel resume --skip-list).\nExit 0: done; 2: bad "
                 "input or a failed replay (the cause is named).\n\n"
              << options;
    return 0;
  }
  o.json = vm.count("json") > 0;
  o.keep = vm.count("keep") > 0;
  if (vm.count("max-loss")) o.threshold.max_loss = max_loss;
  if (vm.count("max-grad-norm")) o.threshold.max_grad_norm = max_grad_norm;
  if (o.json) spdlog::set_level(spdlog::level::warn);  // stdout carries the JSON object alone
  try {
    if (positional.size() != 1)
      throw BadInput("expected one RUN_DIR, got " + std::to_string(positional.size()) + " (see keel forensics --help)");
    o.run = positional[0];
    if (!vm.count("step")) throw BadInput("--step N is required (see keel forensics --help)");
    if (o.step < 0) throw BadInput("--step must be >= 0, got " + std::to_string(o.step));
    if (o.threshold.window < 2 || o.threshold.min_history < 2 || o.threshold.min_history > o.threshold.window)
      throw BadInput("--window must be >= 2 and --min-history in [2, window]");
    if (o.max_memory_mb < 1) throw BadInput("--max-memory-mb must be >= 1");
    return run_forensics(o);
  } catch (const std::exception& e) {
    std::cerr << "keel forensics: error: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace keel::cli

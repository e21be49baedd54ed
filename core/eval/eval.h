// Why: `keel eval` answers "how good is this checkpoint, and how much of its training data can it recite?"
// (LLM360 releases perplexity and Analysis360's memorization score per checkpoint). Two
// measurements, both in fp32 under no_grad on one process, whatever layout trained the checkpoint:
//   - per-source NLL / perplexity on a fixed, deterministic set of eval samples per source: by default the
//     source's held-out set (documents `keel data prepare` kept out of training, so `seen_in_training` = 0);
//     with split train-tail, the last N positions of the source's epoch-0 order (the samples training reaches
//     last), which a run that has gone that far HAS trained on: the count of eval samples the checkpoint had
//     already consumed is reported next to every number (`seen_in_training`), never hidden;
//   - memorization score(k, l) (Analysis360): for training sequences the checkpoint has consumed, the share of
//     the l greedily generated tokens after a k-token prompt that equal the true next l tokens; 1 = extractable.
// The scoring is written against a plain "next token" function so that it can be checked by hand (tests).
// Shapes: N sequences, T seq_len, V vocab.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "core/checkpoint/training_state.h"
#include "core/config/config.h"
#include "core/data/loader.h"
#include "core/model/llama.h"

namespace keel::eval {

inline constexpr int64_t kPromptTokens = 32;        // k of Analysis360
inline constexpr int64_t kContinuationTokens = 32;  // l of Analysis360

// One training sequence: where it came from and its tokens (a sample: seq_len + 1 ids).
struct TrainingSequence {
  int32_t source = 0;
  int64_t sample_id = 0;
  int64_t chunk = 0;
  std::vector<int32_t> tokens;
};

// Given a batch of prefixes of equal length, the next token of each (greedy: argmax).
using NextTokenFn = std::function<std::vector<int32_t>(const std::vector<std::vector<int32_t>>& prefixes)>;

struct MemorizationOptions {
  int64_t prompt_tokens = kPromptTokens;
  int64_t continuation_tokens = kContinuationTokens;
  int64_t batch = 16;  // sequences generated together
};

// Per scored sequence (same index in every vector); sequences shorter than k + l are skipped and counted.
struct MemorizationScores {
  std::vector<int32_t> source;
  std::vector<int64_t> sample_id;
  std::vector<int64_t> chunk;
  std::vector<double> score;  // matching tokens / l, in [0, 1]
  int64_t skipped_short = 0;
};

// Greedy-generates l tokens after the first k of each sequence with `next_token` and compares them with the
// sequence's tokens [k, k + l). Throws std::invalid_argument for k or l < 1 or batch < 1, or if `next_token`
// returns the wrong number of tokens.
MemorizationScores score_memorization(const std::vector<TrainingSequence>& sequences, const NextTokenFn& next_token,
                                      const MemorizationOptions& options = {});

// Mean score and share of fully extractable sequences (score == 1) over a group of sequences.
struct MemorizationSummary {
  int32_t source = 0;
  int64_t chunk = -1;  // -1: all chunks of the source
  int64_t sequences = 0;
  double mean_score = 0.0;
  double extractable_share = 0.0;
};
// One summary per source (chunk -1) followed by one per (source, chunk) present, chunks ascending.
std::vector<MemorizationSummary> summarize_memorization(const MemorizationScores& scores, int32_t num_sources);

// The greedy next-token function of `model` (fp32 forward of the whole prefix, argmax of the last position).
NextTokenFn greedy_next_token(const model::Llama& model);

// A single-process fp32 model of `config.model` holding the checkpoint's whole weights, copied by parameter
// name. Throws CheckpointError naming `checkpoint_dir` and the tensor when one is missing or has another shape.
model::Llama load_model(const Config& config, const checkpoint::TrainingState& state,
                        const std::string& checkpoint_dir);

// Mean token NLL of each window: windows [N, T+1] int64 (inputs [:, :T], targets [:, 1:]) -> N values, fp32
// logits under no_grad, evaluated `batch` windows at a time.
std::vector<double> window_nll(const model::Llama& model, const torch::Tensor& windows, int64_t batch);

// The eval samples of source `name` (`samples` per epoch): the last `count` positions of its epoch-0 order
// under data seed `seed` (all of them if the source is smaller), in that order.
std::vector<int64_t> eval_sample_ids(uint64_t seed, const std::string& name, int64_t samples, int64_t count);

// Every sample the checkpoint's training consumed, in order (duplicates across epochs kept): the ledger's
// mixture history and skip rules are loaded into `loader`, which then replays steps [0, ledger step).
std::vector<data::SampleRef> consumed_samples(data::DataLoader& loader, const std::string& ledger_json);

// Up to `per_chunk` distinct consumed samples of every (source, chunk), evenly spaced in consumption order.
std::vector<data::SampleRef> pick_memorization_samples(const std::vector<data::SampleRef>& consumed, int64_t per_chunk);

// Which samples the per-source NLL is measured on (docs/eval.md). kAuto: the held-out set when every source has
// one, else train-tail (with a warning).
enum class Split { kAuto, kHeldout, kTrainTail };
Split parse_split(const std::string& name);  // "auto" | "heldout" | "train-tail"; throws std::invalid_argument
std::string name_of(Split split);

// The held-out windows of `source` (at most `count`): consecutive windows of seq_len + 1 tokens of its held-out
// token stream, window i starting at token i * seq_len (as training samples do). Throws DataError naming the
// source when it has no held-out set or one shorter than one window.
std::vector<std::vector<int32_t>> heldout_windows(const std::string& data_dir, const std::string& source,
                                                  int64_t seq_len, int64_t count);

struct SourcePerplexity {
  std::string source;
  std::vector<int64_t> sample_ids;
  std::vector<double> sample_nll;  // per sample, mean over its T tokens
  int64_t tokens = 0;              // predicted tokens
  int64_t seen_in_training = 0;    // eval samples the checkpoint had consumed
  double mean_nll = 0.0;           // token-weighted
  double perplexity = 0.0;         // exp(mean_nll)
};

struct EvalReport {
  std::string checkpoint_dir;
  int64_t step = 0;
  Split split = Split::kTrainTail;  // resolved: kHeldout or kTrainTail
  std::vector<std::string> source_names;
  std::vector<SourcePerplexity> perplexity;
  MemorizationScores memorization;
  std::vector<MemorizationSummary> memorization_summary;
  MemorizationOptions memorization_options;
};

struct EvalOptions {
  int64_t batches = 8;               // eval batches (of train.micro_batch windows) per source
  int64_t memorization_samples = 8;  // consumed training sequences scored per (source, chunk)
  Split split = Split::kAuto;
};

// The whole measurement of one checkpoint: loads its weights into an fp32 model of `config.model`, scores every
// source's eval samples (and counts those the checkpoint consumed) and the memorization of consumed sequences.
// `config` is the checkpoint's config (its data.dir must hold the prepared data). Throws CheckpointError or
// DataError naming the tensor, file or key.
EvalReport evaluate_checkpoint(const Config& config, const checkpoint::TrainingState& state,
                               const std::string& checkpoint_dir, int64_t step, const EvalOptions& options);

// Writes `report` to a new HDF5 file (refuses an existing one); layout in docs/eval.md. The file is written as
// PATH.tmp-PID, flushed to disk and then renamed to PATH, so PATH is complete or absent: a full disk or an
// unwritable directory throws std::runtime_error("eval: cannot write PATH: <OS error>") and leaves nothing.
void write_report(const std::string& path, const EvalReport& report);
// The short table `keel eval` prints.
std::string format_report(const EvalReport& report);
// What `keel eval --json` prints (docs/cli.md): per source the NLL, perplexity, tokens and seen_in_training; per
// source the memorization summary; per (source, chunk) the memorization summaries; `out`: the HDF5 file written.
nlohmann::json report_json(const EvalReport& report, const std::string& out_path);

// `keel eval --all RUN`: the per-source NLL of every checkpoint of a run as one curve file (layout in
// docs/eval.md, format "keel-eval-curve"); written atomically, replacing an earlier curve. Throws
// std::runtime_error("eval: cannot write PATH: ...") like write_report. `reports` ascending by step, same sources.
void write_curve(const std::string& path, const std::string& run_dir, const std::vector<EvalReport>& reports);
// What `keel eval --all --json` prints: run, out, split, one entry per checkpoint (step, per source nll,
// perplexity, seen_in_training).
nlohmann::json curve_json(const std::string& run_dir, const std::vector<EvalReport>& reports,
                          const std::string& out_path);

}  // namespace keel::eval

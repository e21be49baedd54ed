// Why: the data order of a run must be a pure function of (data.seed, data config, step) — so that any batch
// can be shown again (`keel data show-batch --step N`), a run can resume or branch exactly, and a mixture
// change mid-run neither repeats nor drops a sample. This file is that function:
//   - each source's token stream (its shards, concatenated) is cut into samples of seq_len+1 tokens,
//     sample i = tokens[i*seq_len, i*seq_len + seq_len + 1) (documents packed, separated by EOS);
//   - each source walks its own per-epoch permutation of sample ids with a cursor (skip-listed samples are
//     passed over); an epoch's order is cut into data.chunks contiguous chunks;
//   - the source of batch slot j of step s is a Gumbel-max choice (data-order version 2): source i draws
//     U_i = hash(seed, s, j, name_i), and the slot takes argmin_i -log(U_i) / w_i under the weights active at s
//     (data.mixture, data.schedule, or changes recorded mid-run). The noise is keyed by the source's name, so two
//     arms with different mixtures pick the same source in as many slots as possible (common random numbers),
//     whatever the order of the sections. (s, j) are the coordinates of the global sample index g in the run's
//     first global batch B0 (s = g / B0, j = g % B0): the same as the step and slot while the batch stays B0, and
//     a function of g alone when it changes (train.batch_schedule, a resume with another batch), so that a
//     batch change neither repeats nor drops a sample and reads them in the constant-batch order. Ledgers without a
//     data_order_version (version 1, older checkpoints) keep the inverse-CDF pick of a hash of (seed, global sample)
//     they were trained with.
// Planning never reads tokens, so seek(step) is a cheap replay; tokens() reads a plan's samples from the shards.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "core/config/batch_schedule.h"
#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/data/mixture.h"
#include "core/data/shard.h"
#include "core/data/token_stream.h"

namespace at {
class Tensor;
}

namespace keel::data {

class Tokenizer;

struct SampleRef {
  int32_t source = 0;     // index into source_names()
  int64_t sample_id = 0;  // unpermuted sample id within the source
  int64_t epoch = 0;      // the source's epoch this sample was drawn in
  int64_t chunk = 0;      // chunk of its position in that epoch's order: position * chunks / samples_per_epoch
};

struct BatchPlan {
  int64_t step = 0;
  int64_t first_sample = 0;        // global sample index of samples[0]
  std::vector<SampleRef> samples;  // the global batch, in order; rank r of R takes a contiguous slice
};

// The per-epoch order of a source: a Fisher-Yates shuffle of [0, n) driven by splitmix64 seeded from
// (seed, source name, epoch). Portable and stable forever (part of the data format).
std::vector<int64_t> epoch_permutation(uint64_t seed, const std::string& source, int64_t epoch, int64_t n);
// Data-order version 1: the uniform in [0, 1) whose inverse CDF picks the source of global sample g.
double source_pick_uniform(uint64_t seed, int64_t global_sample);
// Data-order version 2: the uniform in (0, 1) that source `source` draws for slot `slot` of step `step`.
double source_pick_noise(uint64_t seed, int64_t step, int64_t slot, const std::string& source);
// Data-order version 2: the Gumbel-max pick argmin_i -log(source_pick_noise(.., sources[i])) / weights[i] over
// sources with weights[i] > 0 (weights at any positive scale). The order of `sources` does not matter.
int32_t gumbel_pick(uint64_t seed, int64_t step, int64_t slot, const std::vector<std::string>& sources,
                    const std::vector<double>& weights);
// The data-order version of new runs (recorded in the ledger as data_order_version).
constexpr int kDataOrderVersion = 2;

class DataLoader {
 public:
  // Opens DIR/prepared.json and every shard (validated, vocab == config.model.vocab). Throws DataError
  // "data not prepared in DIR: run `keel data prepare --config FILE`" if it is missing or stale. Steps read
  // `global_batch` samples, or follow config.train.batch_schedule when it is set (its batch at step 0 must then be
  // `global_batch`).
  DataLoader(const keel::Config& config, int64_t global_batch);
  ~DataLoader();
  DataLoader(DataLoader&&) noexcept;
  DataLoader& operator=(DataLoader&&) noexcept;

  // The plan of the current step; advances the source cursors and the step.
  BatchPlan plan_next();
  // Reset, then replay plans up to `step` (hashes and cursor moves only, no token reads).
  void seek(int64_t step);
  int64_t step() const { return step_; }
  // The global batch of the step planned next (step()).
  int64_t global_batch() const { return batch_at(batch_stages_, step_); }
  int64_t global_batch_at(int64_t step) const { return batch_at(batch_stages_, step); }
  // The global batch by step: from step 0, each stage with the step it applies from (train.batch_schedule, or a
  // change adopted at a resume). Recorded in the ledger as batch_history when it has more than one stage.
  const std::vector<keel::BatchStage>& batch_history() const { return batch_stages_; }
  int64_t seq_len() const { return seq_len_; }

  // Tokens of plan.samples[begin, begin + count): int64 tensor [count, seq_len + 1] (inputs = [:, :-1],
  // targets = [:, 1:]).
  at::Tensor tokens(const BatchPlan& plan, int64_t begin, int64_t count) const;
  // Tokens of one sample (seq_len + 1 ids).
  std::vector<int32_t> sample_tokens(int32_t source, int64_t sample_id) const;

  // Change the mixture from `from_step` (>= step()) on: stages at or after from_step are replaced by this one.
  // weights: "prose=0.3,code=0.7". Recorded in the ledger's mixture history.
  void set_mixture(int64_t from_step, const std::string& weights, const std::string& origin = "set_mixture");
  // Add skip rules ("prose:chunk:3;code:samples:10-20") that apply from `from_step` (>= step()) on.
  void add_skip(int64_t from_step, const std::string& spec, const std::string& origin = "add_skip");
  // After load_state(): make the future follow `config`'s mixture/schedule, skip list and global batch (train.
  // micro_batch x train.grad_accum, train.batch_schedule) where they differ from the ledger (a branch with a new
  // data mix or batch). Changes apply from step(); returns a line per change.
  std::vector<std::string> adopt_config(const keel::Config& config);
  // The normalized weights active at `step`.
  std::vector<double> weights_at(int64_t step) const;
  // The skip rules, in the order they were added.
  const std::vector<SkipRule>& skip_rules() const { return skip_; }
  // Carry skip rules of another history of this run into this loader, so that none is lost when an older ledger
  // is loaded: `skip` is a ledger's "skip" list (state()["skip"]: the rules before a rollback reloaded a
  // checkpoint, or a parent run's rules at a resume). A rule this loader lacks (no rule with the same spec covers
  // its window from the carry step on) is added from step() if `from_now` (a rollback retrains without what it
  // has skipped), else from max(its from_step, step()) (a resume follows the parent's later history), keeping its
  // to_step and origin. Returns a line per rule added.
  std::vector<std::string> carry_skip(const nlohmann::json& skip, bool from_now);
  // 2 for new runs; 1 after loading a ledger written before data-order versions (inverse-CDF pick).
  int data_order_version() const { return data_order_version_; }

  // The ledger: step, global sample counter, per-source cursors, mixture history, skip rules, fingerprint.
  nlohmann::json state() const;
  // Restore a ledger written by state(). Throws DataError if it was written for other data (fingerprint),
  // another seed, seq_len or chunk count. The ledger's global batch history is put in force (adopt_config()
  // changes its future). With `allow_data_change` a fingerprint mismatch is
  // accepted (the caller records it): cursors keep their epoch and position, clamped to the new epoch size.
  void load_state(const nlohmann::json& ledger, bool allow_data_change = false);
  // vocab, eos, tokenizer and prepared fingerprints, per-source shard token counts (resume refuses a mismatch).
  nlohmann::json fingerprint() const;

  const std::vector<std::string>& source_names() const { return names_; }
  int64_t samples_per_epoch(int32_t source) const;
  int64_t source_tokens(int32_t source) const;
  int64_t vocab() const { return vocab_; }
  int32_t eos_id() const { return eos_id_; }
  const std::string& dir() const { return dir_; }
  // Decode ids with DIR/tokenizer.model, loaded on first use (training never needs it). Throws DataError if the
  // directory has no tokenizer.
  std::string decode(const std::vector<int32_t>& ids) const;
  const Tokenizer& tokenizer() const;

 private:
  struct Source {
    std::string name;
    // Keel shards, or the files of a pre-tokenized source read in place (pretokenized_source.h).
    std::vector<std::unique_ptr<TokenStream>> shards;
    std::vector<int64_t> shard_begin;  // first token of each shard in the concatenated stream
    int64_t tokens = 0;
    int64_t samples = 0;  // samples per epoch: (tokens - 1) / seq_len
    // Cursor.
    int64_t epoch = 0;
    int64_t position = 0;        // next position in this epoch's order
    int64_t consumed = 0;        // samples returned, all epochs
    int64_t skipped = 0;         // samples passed over by skip rules, all epochs
    std::vector<int64_t> order;  // the permutation of `order_epoch`
    int64_t order_epoch = -1;
  };

  void reset_cursors();
  // The source of global sample `global_sample`, planned at step `step`; `table` is pick_table_at(step).
  int32_t pick_source(int64_t step, int64_t global_sample, const std::vector<double>& table) const;
  // The config's batch stages whose future differs from batch_stages_' from step_ on, adopted; "" if none.
  std::string adopt_batch(const keel::Config& config);
  // The normalized weights at `step` (version 2) or their CDF (version 1).
  std::vector<double> pick_table_at(int64_t step) const;
  std::vector<SkipRule> skip_from_json(const nlohmann::json& skip) const;
  SampleRef next_sample(int32_t source);
  void check_from_step(int64_t from_step, const std::string& what) const;

  std::string dir_;
  std::string config_file_;
  int64_t vocab_ = 0;
  int32_t eos_id_ = 0;
  std::string prepared_fingerprint_;
  std::string tokenizer_fingerprint_;
  uint64_t seed_ = 0;
  int64_t seq_len_ = 0;
  int64_t chunks_ = 1;
  std::vector<keel::BatchStage> batch_stages_;  // sorted by from_step, the first at step 0; the batch history
  std::vector<std::string> names_;
  std::vector<Source> sources_;
  std::vector<MixtureStage> stages_;  // sorted by from_step; the mixture history
  std::vector<SkipRule> skip_;
  int data_order_version_ = kDataOrderVersion;
  int64_t step_ = 0;
  int64_t next_sample_ = 0;  // global sample counter
  std::string tokenizer_path_;
  mutable std::unique_ptr<Tokenizer> tokenizer_;  // loaded by tokenizer() on first use
  mutable std::unique_ptr<std::mutex> tokenizer_mutex_;
};

}  // namespace keel::data

// Why: see loader.h. Everything random here comes from hash.h (never std:: distributions), so the data order is
// the same on every platform. Planning (which source, which sample) and reading (tokens from shards) are
// separate: planning is cheap enough to replay millions of steps in seek().
#include "core/data/loader.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <sstream>

#include "core/data/hash.h"
#include "core/data/prepare.h"
#include "core/data/pretokenized_source.h"
#include "core/data/tokenizer.h"
#include "core/io/regular_file.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace keel::data {
namespace {

constexpr uint64_t kPermutationSalt = 0x6b65656c7065726dULL;  // "keelperm"
constexpr uint64_t kPickSalt = 0x6b65656c7069636bULL;         // "keelpick"
constexpr uint64_t kNoiseSalt = 0x6b65656c6e6f6973ULL;        // "keelnois"
constexpr int kLedgerVersion = 1;
constexpr const char* kConfigSkipOrigin = "data.skip";

std::vector<double> normalized(const std::vector<double>& w) {
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  std::vector<double> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = w[i] / sum;
  return out;
}

// The mixture stages a config asks for; always starts at step 0.
std::vector<MixtureStage> config_stages(const keel::DataConfig& data, const std::vector<std::string>& names,
                                        const std::vector<int64_t>& tokens) {
  MixtureStage base;
  if (!data.mixture.empty()) {
    base.weights = parse_weights(data.mixture, names, "data.mixture");
    base.origin = "data.mixture";
  } else {
    for (int64_t t : tokens) base.weights.push_back(static_cast<double>(t));
    base.origin = "proportional";
  }
  std::vector<MixtureStage> stages;
  if (!data.schedule.empty()) stages = parse_schedule(data.schedule, names, "data.schedule");
  if (stages.empty() || stages.front().from_step > 0) stages.insert(stages.begin(), base);
  return stages;
}

// The global batch history of a ledger (loader.h: batch_history()).
std::vector<keel::BatchStage> batch_history_from_json(const json& ledger) {
  std::vector<keel::BatchStage> out;
  if (!ledger.contains("batch_history")) {  // a constant batch (every ledger before batch changes)
    out.push_back({0, ledger.at("global_batch").get<int64_t>(), "train.grad_accum"});
  } else {
    for (const auto& b : ledger.at("batch_history")) {
      out.push_back({b.at("from_step").get<int64_t>(), b.at("global_batch").get<int64_t>(), b.value("origin", "")});
    }
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].global_batch < 1 || (i == 0 ? out[i].from_step != 0 : out[i].from_step <= out[i - 1].from_step)) {
      throw DataError("data ledger: batch_history must start at step 0, increase in steps and hold batches >= 1");
    }
  }
  return out;
}

const MixtureStage& stage_at(const std::vector<MixtureStage>& stages, int64_t step) {
  const MixtureStage* active = &stages.front();
  for (const auto& s : stages) {
    if (s.from_step <= step) active = &s;
  }
  return *active;
}

}  // namespace

std::vector<int64_t> epoch_permutation(uint64_t seed, const std::string& source, int64_t epoch, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  SplitMix64 rng(
      hash_combine(hash_combine(mix64(seed ^ kPermutationSalt), fnv1a64(source)), static_cast<uint64_t>(epoch)));
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(bounded(rng.next(), static_cast<uint64_t>(i) + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

double source_pick_uniform(uint64_t seed, int64_t global_sample) {
  return unit_double(hash_combine(mix64(seed ^ kPickSalt), static_cast<uint64_t>(global_sample)));
}

double source_pick_noise(uint64_t seed, int64_t step, int64_t slot, const std::string& source) {
  uint64_t h = hash_combine(mix64(seed ^ kNoiseSalt), static_cast<uint64_t>(step));
  h = hash_combine(hash_combine(h, static_cast<uint64_t>(slot)), fnv1a64(source));
  return (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;  // 53 random bits, centred: never 0 or 1
}

int32_t gumbel_pick(uint64_t seed, int64_t step, int64_t slot, const std::vector<std::string>& sources,
                    const std::vector<double>& weights) {
  // -log(U) / w is an Exp(w) variable; the smallest of them is source i with probability w_i / sum(w). std::log
  // is the one libm function in the data order: libms may differ in the last bit, which could flip a pick only
  // when two keys agree to ~1e-16 (never seen; the per-epoch orders use integers only).
  int32_t best = -1;
  double best_key = 0;
  for (size_t i = 0; i < sources.size() && i < weights.size(); ++i) {
    if (!(weights[i] > 0)) continue;
    const double key = -std::log(source_pick_noise(seed, step, slot, sources[i])) / weights[i];
    if (best < 0 || key < best_key) {
      best = static_cast<int32_t>(i);
      best_key = key;
    }
  }
  if (best < 0) throw DataError("source pick: no source has a positive weight");
  return best;
}

DataLoader::DataLoader(const keel::Config& config, int64_t global_batch)
    : dir_(config.data.dir.empty() ? config.data.dir : fs::absolute(config.data.dir).string()),
      config_file_(config.source_file.empty() ? "FILE" : config.source_file),
      seed_(config.data.seed),
      seq_len_(config.model.seq_len),
      chunks_(std::max<int64_t>(1, config.data.chunks)) {
  if (global_batch <= 0) throw DataError("global batch must be > 0, got " + std::to_string(global_batch));
  batch_stages_ = {keel::BatchStage{0, global_batch, "train.grad_accum"}};
  if (config.train.batch_schedule.find_first_not_of(" \t") != std::string::npos) {
    try {
      batch_stages_ = keel::parse_batch_schedule(config.train.batch_schedule);
    } catch (const keel::ConfigError& e) {
      throw DataError(e.what());
    }
    if (batch_stages_.front().global_batch != global_batch) {
      throw DataError("train.batch_schedule starts at a global batch of " +
                      std::to_string(batch_stages_.front().global_batch) + ", not " + std::to_string(global_batch));
    }
  }
  if (seq_len_ <= 0) throw DataError("model.seq_len must be > 0, got " + std::to_string(seq_len_));
  const std::string prepare_hint = "run `keel data prepare --config " + config_file_ + "`";
  // Damaged prepared data is rebuilt by the command below; the data dir is named so that the fix lands here.
  const std::string rebuild_hint =
      "rebuild with: keel data prepare --config " + config_file_ + " --set data.dir=" + dir_ + " --force";
  auto damaged = [&](const std::string& path, const std::string& what) {
    const bool not_a_file = !io::non_regular_error(path).empty();
    return DataError(what + "; " + (not_a_file ? "move it away, then " : "") + rebuild_hint);
  };
  const std::string manifest_path = dir_ + "/prepared.json";
  json manifest;
  {
    std::error_code ec;
    if (!fs::exists(manifest_path, ec)) throw DataError("data not prepared in " + dir_ + ": " + prepare_hint);
    std::string text;
    try {
      text = io::read_regular_file<DataError>(manifest_path);
    } catch (const DataError& e) {
      throw damaged(manifest_path, e.what());
    }
    try {
      manifest = json::parse(text);
    } catch (const std::exception& e) {
      throw DataError(manifest_path + ": unreadable (" + e.what() + "): " + prepare_hint);
    }
  }
  try {
    if (manifest.at("format_version").get<int>() != kPreparedFormatVersion) {
      throw DataError(manifest_path + ": prepared-data format version " +
                      std::to_string(manifest.at("format_version").get<int>()) + ", this Keel reads " +
                      std::to_string(kPreparedFormatVersion) + ": " + prepare_hint);
    }
    vocab_ = manifest.at("vocab").get<int64_t>();
    eos_id_ = manifest.at("eos_id").get<int32_t>();
    prepared_fingerprint_ = manifest.value("fingerprint", "");
    tokenizer_fingerprint_ = manifest.value("tokenizer", json::object()).value("fingerprint", "");
    if (vocab_ != config.model.vocab) {
      throw DataError("data in " + dir_ + " was prepared for vocab " + std::to_string(vocab_) +
                      " but model.vocab = " + std::to_string(config.model.vocab) + ": " + prepare_hint);
    }
    for (const auto& s : manifest.at("sources")) names_.push_back(s.at("name").get<std::string>());
    if (!config.data.sources.empty()) {
      std::vector<std::string> want;
      for (const auto& s : config.data.sources) want.push_back(s.name);
      std::vector<std::string> have = names_;
      std::sort(want.begin(), want.end());
      std::sort(have.begin(), have.end());
      if (want != have) {
        auto list = [](const std::vector<std::string>& v) {
          std::string out;
          for (const auto& n : v) out += (out.empty() ? "" : ", ") + n;
          return out;
        };
        throw DataError("data in " + dir_ + " was prepared for sources [" + list(names_) + "] but the config lists [" +
                        list(want) + "]: " + prepare_hint);
      }
    }
    for (const auto& s : manifest.at("sources")) {
      Source src;
      src.name = s.at("name").get<std::string>();
      if (s.contains("token_files")) {  // a pre-tokenized source, read in place
        try {
          src.shards = open_pretokenized_entry(s, vocab_);
        } catch (const DataError& e) {
          throw DataError(std::string(e.what()) + ": " + prepare_hint);
        }
        for (const auto& stream : src.shards) {
          src.shard_begin.push_back(src.tokens);
          src.tokens += stream->num_tokens();
        }
      }
      for (const auto& sh : s.value("shards", json::array())) {
        const std::string path = dir_ + "/" + sh.at("file").get<std::string>();
        if (!fs::exists(path)) throw DataError(path + ": shard listed in prepared.json is missing: " + prepare_hint);
        const int64_t listed_tokens = sh.at("tokens").get<int64_t>();
        std::optional<ShardReader> opened;
        try {
          opened.emplace(open_prepared_shard(path, vocab_, listed_tokens, eos_id_));
        } catch (const DataError& e) {
          throw damaged(path, e.what());
        }
        ShardReader& reader = *opened;
        src.shard_begin.push_back(src.tokens);
        src.tokens += reader.num_tokens();
        src.shards.push_back(std::make_unique<ShardReader>(std::move(reader)));
      }
      src.samples = src.tokens > 0 ? (src.tokens - 1) / seq_len_ : 0;
      if (src.samples <= 0) {
        throw DataError("source " + src.name + " in " + dir_ + " has " + std::to_string(src.tokens) +
                        " tokens, fewer than one sample of seq_len + 1 = " + std::to_string(seq_len_ + 1));
      }
      sources_.push_back(std::move(src));
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(manifest_path + ": malformed (" + e.what() + "): " + prepare_hint);
  }
  if (sources_.empty()) throw DataError(manifest_path + ": no sources: " + prepare_hint);

  std::vector<int64_t> tokens;
  for (const auto& s : sources_) tokens.push_back(s.tokens);
  stages_ = config_stages(config.data, names_, tokens);
  skip_ = parse_skip(config.data.skip, names_, 0, "data.skip");
  // Pre-tokenized data comes without a tokenizer (tokenizer_path_ stays empty; decode() says so).
  if (!manifest.value("pretokenized", false)) {
    tokenizer_path_ = dir_ + "/" + manifest.value("tokenizer", json::object()).value("file", "tokenizer.model");
  }
  tokenizer_mutex_ = std::make_unique<std::mutex>();
}

DataLoader::~DataLoader() = default;
DataLoader::DataLoader(DataLoader&&) noexcept = default;
DataLoader& DataLoader::operator=(DataLoader&&) noexcept = default;

int64_t DataLoader::samples_per_epoch(int32_t source) const { return sources_.at(source).samples; }
int64_t DataLoader::source_tokens(int32_t source) const { return sources_.at(source).tokens; }

void DataLoader::reset_cursors() {
  for (auto& s : sources_) {
    s.epoch = 0;
    s.position = 0;
    s.consumed = 0;
    s.skipped = 0;
  }
  step_ = 0;
  next_sample_ = 0;
}

std::vector<double> DataLoader::weights_at(int64_t step) const { return normalized(stage_at(stages_, step).weights); }

std::vector<double> DataLoader::pick_table_at(int64_t step) const {
  std::vector<double> table = weights_at(step);
  if (data_order_version_ == 1) {
    for (size_t i = 1; i < table.size(); ++i) table[i] += table[i - 1];
  }
  return table;
}

int32_t DataLoader::pick_source(int64_t step, int64_t global_sample, const std::vector<double>& table) const {
  // The noise of global sample g sits at (g / B0, g % B0) of the first global batch B0: the step and slot while
  // the batch is B0, and the same coordinates whatever batch later steps read (loader.h).
  const int64_t first_batch = batch_stages_.front().global_batch;
  if (data_order_version_ >= 2)
    return gumbel_pick(seed_, global_sample / first_batch, global_sample % first_batch, names_, table);
  (void)step;
  // Version 1: inverse CDF of a hash of the global sample (the order of the sections matters).
  const std::vector<double>& cdf = table;
  const double u = source_pick_uniform(seed_, global_sample);
  for (size_t i = 0; i < cdf.size(); ++i) {
    if (u < cdf[i]) return static_cast<int32_t>(i);
  }
  // u within rounding of 1: the last source with a positive weight.
  for (size_t i = cdf.size(); i-- > 0;) {
    if (i == 0 || cdf[i] > cdf[i - 1]) return static_cast<int32_t>(i);
  }
  return 0;
}

// Advance source `index`'s cursor to its next sample not skipped at step_.
SampleRef DataLoader::next_sample(int32_t index) {
  Source& s = sources_[index];
  const int64_t n = s.samples;
  int64_t scanned = 0;
  while (true) {
    if (scanned > n) {
      throw DataError("skip list leaves no sample of source " + s.name + " at step " + std::to_string(step_));
    }
    if (s.position >= n) {
      ++s.epoch;
      s.position = 0;
    }
    const auto chunk = static_cast<int64_t>(static_cast<__int128>(s.position) * chunks_ / n);  // chunk of this position
    // A skipped chunk is jumped over at once: positions [ceil(c*n/C), ceil((c+1)*n/C)) form chunk c.
    bool jumped = false;
    for (const auto& r : skip_) {
      if (r.source != index || r.kind != SkipRule::Kind::kChunk || !r.active_at(step_)) continue;
      if (chunk >= r.first && chunk <= r.last) {
        const auto end = static_cast<int64_t>(
            std::min<__int128>(n, ((static_cast<__int128>(r.last) + 1) * n + chunks_ - 1) / chunks_));
        s.skipped += end - s.position;
        scanned += end - s.position;
        s.position = end;
        jumped = true;
        break;
      }
    }
    if (jumped) continue;
    if (s.order_epoch != s.epoch) {
      s.order = epoch_permutation(seed_, s.name, s.epoch, n);
      s.order_epoch = s.epoch;
    }
    const int64_t id = s.order[static_cast<size_t>(s.position)];
    ++s.position;
    ++scanned;
    bool skipped = false;
    for (const auto& r : skip_) {
      if (r.source == index && r.kind == SkipRule::Kind::kSamples && r.active_at(step_) && id >= r.first &&
          id <= r.last) {
        skipped = true;
        break;
      }
    }
    if (skipped) {
      ++s.skipped;
      continue;
    }
    ++s.consumed;
    return SampleRef{index, id, s.epoch, chunk};
  }
}

BatchPlan DataLoader::plan_next() {
  BatchPlan plan;
  plan.step = step_;
  plan.first_sample = next_sample_;
  const int64_t batch = global_batch();
  plan.samples.reserve(static_cast<size_t>(batch));
  const std::vector<double> table = pick_table_at(step_);
  for (int64_t j = 0; j < batch; ++j) {
    const int32_t source = pick_source(step_, next_sample_++, table);
    plan.samples.push_back(next_sample(source));
  }
  ++step_;
  return plan;
}

void DataLoader::seek(int64_t step) {
  if (step < 0) throw DataError("seek: step must be >= 0, got " + std::to_string(step));
  reset_cursors();
  while (step_ < step) {
    const std::vector<double> table = pick_table_at(step_);
    const int64_t batch = global_batch();
    for (int64_t j = 0; j < batch; ++j) next_sample(pick_source(step_, next_sample_++, table));
    ++step_;
  }
}

std::vector<int32_t> DataLoader::sample_tokens(int32_t source, int64_t sample_id) const {
  const Source& s = sources_.at(source);
  if (sample_id < 0 || sample_id >= s.samples) {
    throw DataError("source " + s.name + ": sample id " + std::to_string(sample_id) + " out of range [0, " +
                    std::to_string(s.samples) + ")");
  }
  std::vector<int64_t> buf(static_cast<size_t>(seq_len_ + 1));
  int64_t pos = sample_id * seq_len_;
  int64_t done = 0;
  while (done < seq_len_ + 1) {
    const size_t k = static_cast<size_t>(std::upper_bound(s.shard_begin.begin(), s.shard_begin.end(), pos) -
                                         s.shard_begin.begin() - 1);
    const int64_t offset = pos - s.shard_begin[k];
    const int64_t take = std::min(seq_len_ + 1 - done, s.shards[k]->num_tokens() - offset);
    s.shards[k]->read(offset, take, buf.data() + done);
    done += take;
    pos += take;
  }
  return std::vector<int32_t>(buf.begin(), buf.end());
}

at::Tensor DataLoader::tokens(const BatchPlan& plan, int64_t begin, int64_t count) const {
  if (begin < 0 || count < 0 || begin + count > static_cast<int64_t>(plan.samples.size())) {
    throw DataError("tokens: samples [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                    ") out of the plan's " + std::to_string(plan.samples.size()));
  }
  const int64_t width = seq_len_ + 1;
  torch::Tensor out = torch::empty({count, width}, torch::kInt64);  // [count, T+1]
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    const SampleRef& ref = plan.samples[static_cast<size_t>(begin + i)];
    const Source& s = sources_.at(ref.source);
    int64_t pos = ref.sample_id * seq_len_;
    int64_t done = 0;
    while (done < width) {
      const size_t k = static_cast<size_t>(std::upper_bound(s.shard_begin.begin(), s.shard_begin.end(), pos) -
                                           s.shard_begin.begin() - 1);
      const int64_t offset = pos - s.shard_begin[k];
      const int64_t take = std::min(width - done, s.shards[k]->num_tokens() - offset);
      s.shards[k]->read(offset, take, p + i * width + done);
      done += take;
      pos += take;
    }
  }
  return out;
}

void DataLoader::check_from_step(int64_t from_step, const std::string& what) const {
  if (from_step < step_) {
    throw DataError(what + ": cannot change the data order of step " + std::to_string(from_step) +
                    ", already planned up to step " + std::to_string(step_));
  }
}

void DataLoader::set_mixture(int64_t from_step, const std::string& weights, const std::string& origin) {
  check_from_step(from_step, origin);
  MixtureStage stage{from_step, parse_weights(weights, names_, origin), origin};
  stages_.erase(
      std::remove_if(stages_.begin(), stages_.end(), [&](const MixtureStage& s) { return s.from_step >= from_step; }),
      stages_.end());
  stages_.push_back(std::move(stage));
}

void DataLoader::add_skip(int64_t from_step, const std::string& spec, const std::string& origin) {
  check_from_step(from_step, origin);
  for (auto& r : parse_skip(spec, names_, from_step, origin)) skip_.push_back(std::move(r));
}

std::vector<std::string> DataLoader::adopt_config(const keel::Config& config) {
  std::vector<std::string> changes;
  const int64_t now = step_;
  // Mixture: compare the futures (the stage active now, then later stages), with normalized weights.
  const auto cfg = config_stages(config.data, names_, [&] {
    std::vector<int64_t> t;
    for (const auto& s : sources_) t.push_back(s.tokens);
    return t;
  }());
  auto future = [&](const std::vector<MixtureStage>& stages) {
    std::vector<std::pair<int64_t, std::vector<double>>> f{{now, normalized(stage_at(stages, now).weights)}};
    for (const auto& s : stages) {
      if (s.from_step > now) f.emplace_back(s.from_step, normalized(s.weights));
    }
    return f;
  };
  if (future(cfg) != future(stages_)) {
    const std::string was = format_weights(weights_at(now), names_);
    stages_.erase(
        std::remove_if(stages_.begin(), stages_.end(), [&](const MixtureStage& s) { return s.from_step >= now; }),
        stages_.end());
    MixtureStage first = stage_at(cfg, now);
    first.from_step = now;
    first.origin += " (adopted at resume)";
    stages_.push_back(first);
    for (const auto& s : cfg) {
      if (s.from_step > now) stages_.push_back(s);
    }
    changes.push_back("mixture from step " + std::to_string(now) + ": " + format_weights(weights_at(now), names_) +
                      " (was " + was + ")");
  }
  // Skip rules: config rules not active now start now; active rules the config no longer lists end now.
  const auto wanted = parse_skip(config.data.skip, names_, now, "data.skip");
  // Rules added by rollbacks (or carried from a parent run) are not the config's to end.
  for (auto& r : skip_) {
    if (!r.active_at(now) || r.to_step >= 0 || r.origin != kConfigSkipOrigin) continue;
    const bool listed = std::any_of(wanted.begin(), wanted.end(), [&](const SkipRule& w) { return w.spec == r.spec; });
    if (!listed) {
      r.to_step = now;
      changes.push_back("skip " + r.spec + " ends at step " + std::to_string(now));
    }
  }
  skip_.erase(std::remove_if(skip_.begin(), skip_.end(),
                             [](const SkipRule& r) { return r.to_step >= 0 && r.to_step <= r.from_step; }),
              skip_.end());
  for (const auto& w : wanted) {
    const bool active = std::any_of(skip_.begin(), skip_.end(),
                                    [&](const SkipRule& r) { return r.spec == w.spec && r.active_at(now); });
    if (!active) {
      skip_.push_back(w);
      changes.push_back("skip " + w.spec + " from step " + std::to_string(now));
    }
  }
  if (std::string batch = adopt_batch(config); !batch.empty()) changes.push_back(std::move(batch));
  return changes;
}

std::string DataLoader::adopt_batch(const keel::Config& config) {
  // Compare the futures (the batch now, then later stages); the past stays as the ledger recorded it.
  const int64_t now = step_;
  std::vector<keel::BatchStage> cfg;
  try {
    cfg = keel::batch_stages(config);
  } catch (const keel::ConfigError& e) {
    throw DataError(e.what());
  }
  auto future = [&](const std::vector<keel::BatchStage>& stages) {
    std::vector<std::pair<int64_t, int64_t>> f{{now, keel::batch_at(stages, now)}};
    for (const auto& s : stages) {
      if (s.from_step > now) f.emplace_back(s.from_step, s.global_batch);
    }
    return f;
  };
  if (future(cfg) == future(batch_stages_)) return "";
  const int64_t was = global_batch();
  batch_stages_.erase(std::remove_if(batch_stages_.begin(), batch_stages_.end(),
                                     [&](const keel::BatchStage& s) { return s.from_step >= now; }),
                      batch_stages_.end());
  const int64_t batch_now = keel::batch_at(cfg, now);
  // Step 0 (a resume of a checkpoint taken before any step) replaces the first stage; a batch equal to the one
  // in force needs no stage of its own.
  if (batch_stages_.empty() || batch_stages_.back().global_batch != batch_now) {
    const std::string key =
        config.train.batch_schedule.empty() ? "train.micro_batch x train.grad_accum" : "train.batch_schedule";
    batch_stages_.push_back({now, batch_now, key + " (adopted at resume)"});
  }
  for (const auto& s : cfg) {
    if (s.from_step > now) batch_stages_.push_back(s);
  }
  std::string line = "global batch from step " + std::to_string(now) + ": " + std::to_string(global_batch()) +
                     " sequences" + (global_batch() == was ? ", as before" : " (was " + std::to_string(was) + ")");
  for (const auto& b : batch_stages_) {
    if (b.from_step > now) line += ", " + std::to_string(b.global_batch) + " from step " + std::to_string(b.from_step);
  }
  return line;
}

json DataLoader::fingerprint() const {
  json sources = json::array();
  for (const auto& s : sources_) {
    json shards = json::array();
    for (const auto& sh : s.shards) shards.push_back(sh->num_tokens());
    sources.push_back({{"name", s.name}, {"tokens", s.tokens}, {"shard_tokens", shards}});
  }
  return {{"vocab", vocab_},
          {"eos_id", eos_id_},
          {"tokenizer", tokenizer_fingerprint_},
          {"prepared", prepared_fingerprint_},
          {"sources", sources}};
}

json DataLoader::state() const {
  json sources = json::array();
  for (const auto& s : sources_) {
    sources.push_back({{"name", s.name},
                       {"epoch", s.epoch},
                       {"position", s.position},
                       {"consumed", s.consumed},
                       {"skipped", s.skipped},
                       {"samples_per_epoch", s.samples}});
  }
  json history = json::array();
  for (const auto& st : stages_) {
    json w = json::object();
    for (size_t i = 0; i < names_.size(); ++i) w[names_[i]] = st.weights[i];
    history.push_back({{"from_step", st.from_step}, {"weights", w}, {"origin", st.origin}});
  }
  json skip = json::array();
  for (const auto& r : skip_) {
    skip.push_back({{"spec", r.spec}, {"from_step", r.from_step}, {"to_step", r.to_step}, {"origin", r.origin}});
  }
  json out = {{"format", "keel-data-ledger"},
              {"version", kLedgerVersion},
              {"data_order_version", data_order_version_},
              {"step", step_},
              {"next_sample", next_sample_},
              {"global_batch", global_batch()},
              {"seed", seed_},
              {"seq_len", seq_len_},
              {"chunks", chunks_},
              {"sources", sources},
              {"mixture_history", history},
              {"skip", skip},
              {"fingerprint", fingerprint()}};
  // Written only when the batch changes, so that the ledgers of constant-batch runs stay as they were.
  if (batch_stages_.size() > 1) {
    json batches = json::array();
    for (const auto& b : batch_stages_)
      batches.push_back({{"from_step", b.from_step}, {"global_batch", b.global_batch}, {"origin", b.origin}});
    out["batch_history"] = batches;
  }
  return out;
}

void DataLoader::load_state(const json& ledger, bool allow_data_change) {
  try {
    if (ledger.value("format", "") != "keel-data-ledger" || ledger.at("version").get<int>() != kLedgerVersion) {
      throw DataError("data ledger: not a version " + std::to_string(kLedgerVersion) + " keel-data-ledger");
    }
    auto require_same = [&](const char* key, const json& mine, const char* config_key) {
      if (ledger.at(key) != mine) {
        throw DataError("data ledger: " + std::string(key) + " " + ledger.at(key).dump() + " != " + config_key + " " +
                        mine.dump() + " of this run");
      }
    };
    require_same("seed", seed_, "data.seed");
    require_same("seq_len", seq_len_, "model.seq_len");
    require_same("chunks", chunks_, "data.chunks");
    std::vector<keel::BatchStage> batches = batch_history_from_json(ledger);
    if (!allow_data_change && ledger.at("fingerprint") != fingerprint()) {
      throw DataError("data ledger was written for other prepared data: ledger " + ledger.at("fingerprint").dump() +
                      " vs " + dir_ + " " + fingerprint().dump());
    }
    std::vector<MixtureStage> stages;
    for (const auto& h : ledger.at("mixture_history")) {
      MixtureStage st;
      st.from_step = h.at("from_step").get<int64_t>();
      st.origin = h.value("origin", "");
      for (const auto& name : names_) st.weights.push_back(h.at("weights").value(name, 0.0));
      stages.push_back(std::move(st));
    }
    if (stages.empty() || stages.front().from_step != 0)
      throw DataError("data ledger: mixture history must start at step 0");
    // Ledgers written before data-order versions carry none: they were trained with the inverse-CDF pick.
    const int order_version = ledger.value("data_order_version", 1);
    if (order_version < 1 || order_version > kDataOrderVersion) {
      throw DataError("data ledger: data_order_version " + std::to_string(order_version) +
                      " is not known to this Keel (it knows 1.." + std::to_string(kDataOrderVersion) + ")");
    }
    std::vector<SkipRule> skip = skip_from_json(ledger.at("skip"));
    std::vector<Source> restored_cursors(sources_.size());
    for (size_t i = 0; i < sources_.size(); ++i) {
      const json* entry = nullptr;
      for (const auto& s : ledger.at("sources")) {
        if (s.at("name") == sources_[i].name) entry = &s;
      }
      if (!entry) throw DataError("data ledger: no cursor for source " + sources_[i].name);
      restored_cursors[i].epoch = entry->at("epoch").get<int64_t>();
      // Clamped: with allow_data_change a source may have fewer samples per epoch than when the ledger was written.
      restored_cursors[i].position = std::min(entry->at("position").get<int64_t>(), sources_[i].samples);
      restored_cursors[i].consumed = entry->at("consumed").get<int64_t>();
      restored_cursors[i].skipped = entry->at("skipped").get<int64_t>();
      if (restored_cursors[i].epoch < 0 || restored_cursors[i].position < 0)
        throw DataError("data ledger: negative epoch or position for source " + sources_[i].name);
    }
    // All checks passed: commit.
    stages_ = std::move(stages);
    skip_ = std::move(skip);
    batch_stages_ = std::move(batches);
    data_order_version_ = order_version;
    step_ = ledger.at("step").get<int64_t>();
    next_sample_ = ledger.at("next_sample").get<int64_t>();
    for (size_t i = 0; i < sources_.size(); ++i) {
      sources_[i].epoch = restored_cursors[i].epoch;
      sources_[i].position = restored_cursors[i].position;
      sources_[i].consumed = restored_cursors[i].consumed;
      sources_[i].skipped = restored_cursors[i].skipped;
    }
  } catch (const nlohmann::json::exception& e) {
    throw DataError(std::string("data ledger: malformed (") + e.what() + ")");
  }
}

std::vector<SkipRule> DataLoader::skip_from_json(const json& list) const {
  std::vector<SkipRule> skip;
  for (const auto& r : list) {
    const int64_t from_step = r.at("from_step").get<int64_t>();
    // A ledger written before rules recorded their origin: rules from step 0 came from the config, later ones
    // from rollbacks or branches (kept by adopt_config).
    const std::string origin = r.value("origin", from_step == 0 ? kConfigSkipOrigin : "data ledger");
    for (auto& rule : parse_skip(r.at("spec").get<std::string>(), names_, from_step, "data ledger skip")) {
      rule.to_step = r.at("to_step").get<int64_t>();
      rule.origin = origin;
      skip.push_back(std::move(rule));
    }
  }
  return skip;
}

std::vector<std::string> DataLoader::carry_skip(const json& list, bool from_now) {
  std::vector<SkipRule> incoming;
  try {
    incoming = skip_from_json(list);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(std::string("skip rules to carry: malformed (") + e.what() + ")");
  }
  std::vector<std::string> lines;
  for (auto& r : incoming) {
    const int64_t from = from_now ? step_ : std::max(r.from_step, step_);
    if (r.to_step >= 0 && r.to_step <= from) continue;  // over before the carry step: history, not future
    const bool covered = std::any_of(skip_.begin(), skip_.end(), [&](const SkipRule& q) {
      return q.spec == r.spec && q.from_step <= from && (q.to_step < 0 || (r.to_step >= 0 && q.to_step >= r.to_step));
    });
    if (covered) continue;
    r.from_step = from;
    lines.push_back("skip " + r.spec + " from step " + std::to_string(from) +
                    (r.to_step >= 0 ? " to step " + std::to_string(r.to_step) : std::string()) + " (kept: " + r.origin +
                    ")");
    skip_.push_back(std::move(r));
  }
  return lines;
}

const Tokenizer& DataLoader::tokenizer() const {
  std::lock_guard<std::mutex> lock(*tokenizer_mutex_);
  if (!tokenizer_) {
    if (tokenizer_path_.empty()) {
      throw DataError("data in " + dir_ + " is pre-tokenized and has no tokenizer: token ids are not decoded");
    }
    if (!fs::exists(tokenizer_path_)) {
      throw DataError(tokenizer_path_ + ": no tokenizer: run `keel data prepare --config " + config_file_ + "`");
    }
    tokenizer_ = std::make_unique<Tokenizer>(tokenizer_path_);
  }
  return *tokenizer_;
}

std::string DataLoader::decode(const std::vector<int32_t>& ids) const { return tokenizer().decode(ids); }

}  // namespace keel::data

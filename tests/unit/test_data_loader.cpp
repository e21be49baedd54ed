// Why: the data order is a promise — the same (seed, data config, step) gives the same batch in any process,
// seek(N) lands exactly where N sequential steps land, a ledger resumes exactly, mixtures are honoured, a
// mixture change mid-run neither repeats nor drops a sample, skip lists are honoured, and every epoch gets a
// fresh permutation. These tests use small synthetic shards, not the bundled corpus.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/data/loader.h"
#include "core/data/run_order.h"
#include "core/data/shard.h"
#include "test_support.h"

namespace fs = std::filesystem;
using keel::data::BatchPlan;
using keel::data::DataError;
using keel::data::DataLoader;
using keel::data::SampleRef;
using nlohmann::json;

namespace {

using keel::testing::test_dir;
const auto error_of = keel::testing::data_error_of;

constexpr int64_t kVocab = 1024;
constexpr int32_t kEos = 1;

// Token at position i of source s's stream: lets tests check that tokens() reads the right window.
int32_t token_at(int source, int64_t i) { return static_cast<int32_t>((i + 500 * source) % 1000); }

// Writes DIR/prepared.json and shards for sources {name, tokens per shard}; returns a config pointing at it.
keel::Config make_data(const std::vector<std::pair<std::string, std::vector<int64_t>>>& sources, int64_t seq_len = 4) {
  const std::string dir = test_dir();
  json manifest = {{"format", "keel-prepared-data"},
                   {"format_version", 1},
                   {"fingerprint", "synthetic"},
                   {"vocab", kVocab},
                   {"eos_id", kEos},
                   {"sources", json::array()}};
  keel::Config config;
  config.data.dir = dir;
  config.model.vocab = kVocab;
  config.model.seq_len = seq_len;
  config.data.seed = 42;
  config.data.chunks = 10;
  for (size_t s = 0; s < sources.size(); ++s) {
    const auto& [name, shard_tokens] = sources[s];
    fs::create_directories(dir + "/" + name);
    json shards = json::array();
    int64_t pos = 0;
    for (size_t k = 0; k < shard_tokens.size(); ++k) {
      std::vector<int32_t> tokens;
      for (int64_t i = 0; i < shard_tokens[k]; ++i) tokens.push_back(token_at(static_cast<int>(s), pos++));
      const std::string file = name + "/shard-0000" + std::to_string(k) + ".bin";
      const int64_t bytes = keel::data::write_shard(dir + "/" + file, tokens, kVocab, kEos);
      shards.push_back({{"file", file}, {"tokens", shard_tokens[k]}, {"bytes", bytes}});
    }
    manifest["sources"].push_back({{"name", name}, {"tokens", pos}, {"shards", shards}});
    keel::SourceConfig sc;
    sc.name = name;
    config.data.sources.push_back(sc);
  }
  std::ofstream(dir + "/prepared.json") << manifest.dump(2);
  return config;
}

// prose: 20001 tokens in two shards → 5000 samples of seq_len 4; code: 10001 tokens → 2500 samples.
keel::Config two_sources() { return make_data({{"prose", {12000, 8001}}, {"code", {10001}}}); }

bool same(const BatchPlan& a, const BatchPlan& b) {
  if (a.step != b.step || a.first_sample != b.first_sample || a.samples.size() != b.samples.size()) return false;
  for (size_t i = 0; i < a.samples.size(); ++i) {
    const SampleRef &x = a.samples[i], &y = b.samples[i];
    if (x.source != y.source || x.sample_id != y.sample_id || x.epoch != y.epoch || x.chunk != y.chunk) return false;
  }
  return true;
}

// Every sample a loader returns over `steps` steps, per source, in order.
std::map<int32_t, std::vector<SampleRef>> drain(DataLoader& loader, int64_t steps) {
  std::map<int32_t, std::vector<SampleRef>> out;
  for (int64_t s = 0; s < steps; ++s) {
    for (const auto& r : loader.plan_next().samples) out[r.source].push_back(r);
  }
  return out;
}

// The ledger of `loader` as a checkpoint written before data-order versions holds it: no data_order_version, no
// rule origins.
json version1_ledger(const DataLoader& loader) {
  json ledger = json::parse(loader.state().dump());
  ledger.erase("data_order_version");
  for (auto& rule : ledger["skip"]) rule.erase("origin");
  return ledger;
}

// The source name of every slot of the next `steps` plans.
std::vector<std::string> picked_names(DataLoader& loader, int64_t steps) {
  std::vector<std::string> out;
  for (int64_t s = 0; s < steps; ++s) {
    for (const auto& r : loader.plan_next().samples) out.push_back(loader.source_names()[r.source]);
  }
  return out;
}

}  // namespace

TEST(DataLoader, RefusesUnpreparedDataWithAHint) {
  keel::Config config;
  config.data.dir = test_dir() + "/nothing-here";
  config.source_file = "experiments/tiny.ini";
  const std::string message = error_of([&] { DataLoader loader(config, 4); });
  EXPECT_EQ(message,
            "data not prepared in " + config.data.dir + ": run `keel data prepare --config experiments/tiny.ini`");
}

TEST(DataLoader, RefusesVocabMismatchAndOtherSources) {
  keel::Config config = two_sources();
  config.model.vocab = 2048;
  EXPECT_NE(error_of([&] { DataLoader loader(config, 4); }).find("prepared for vocab 1024 but model.vocab = 2048"),
            std::string::npos);
  config.model.vocab = kVocab;
  config.data.sources[1].name = "wiki";
  EXPECT_NE(error_of([&] { DataLoader loader(config, 4); }).find("prepared for sources [prose, code]"),
            std::string::npos);
}

TEST(DataLoader, RefusesACorruptShardNamingIt) {
  keel::Config config = two_sources();
  fs::resize_file(config.data.dir + "/code/shard-00000.bin", 100);
  const std::string message = error_of([&] { DataLoader loader(config, 4); });
  EXPECT_NE(message.find("code/shard-00000.bin: offset 100: truncated"), std::string::npos) << message;
}

TEST(DataLoader, TokensAreTheSampleWindows) {
  keel::Config config = two_sources();
  DataLoader loader(config, 64);
  EXPECT_EQ(loader.samples_per_epoch(0), 5000);
  EXPECT_EQ(loader.samples_per_epoch(1), 2500);
  const BatchPlan plan = loader.plan_next();
  const torch::Tensor t = loader.tokens(plan, 8, 40);  // [40, T+1]
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{40, 5}));
  ASSERT_EQ(t.scalar_type(), torch::kInt64);
  for (int64_t i = 0; i < 40; ++i) {
    const SampleRef& r = plan.samples[8 + i];
    for (int64_t k = 0; k < 5; ++k) EXPECT_EQ(t[i][k].item<int64_t>(), token_at(r.source, r.sample_id * 4 + k));
  }
  // A window straddling the two prose shards (token 12000 starts shard 1): sample 2999 = tokens [11996, 12001).
  const auto w = loader.sample_tokens(0, 2999);
  for (int64_t k = 0; k < 5; ++k) EXPECT_EQ(w[k], token_at(0, 11996 + k));
}

TEST(DataLoader, TwoLoadersGiveIdenticalPlans) {
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.6,code=0.4";
  DataLoader a(config, 16), b(config, 16);
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(same(a.plan_next(), b.plan_next())) << "step " << i;
}

TEST(DataLoader, GoldenOrderIsStable) {
  // Pinned values: if these change, every prepared run's data order changed. Do not update them casually.
  const auto perm = keel::data::epoch_permutation(42, "prose", 0, 10);
  EXPECT_EQ(perm, (std::vector<int64_t>{6, 2, 1, 0, 5, 3, 9, 7, 4, 8}));
  EXPECT_DOUBLE_EQ(keel::data::source_pick_uniform(42, 0), 0.011607946071142128);
  EXPECT_DOUBLE_EQ(keel::data::source_pick_uniform(42, 12345), 0.85101816198531255);
}

TEST(DataLoader, GoldenPlanIsStable) {
  // The plan of one step, pinned when it was first computed (in another process, another build): any change of
  // the sampling code that alters the data order fails here. Version 2 (Gumbel-max pick) for new runs; version
  // 1 (inverse CDF) for a ledger that records no data_order_version, as every checkpoint before version 2.
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.6,code=0.4";
  auto plan_of_step_3 = [](DataLoader& loader) {
    loader.seek(3);
    std::string got;
    for (const auto& r : loader.plan_next().samples) {
      got += std::to_string(r.source) + ":" + std::to_string(r.sample_id) + ":" + std::to_string(r.chunk) + " ";
    }
    return got;
  };
  DataLoader loader(config, 8);
  EXPECT_EQ(loader.data_order_version(), 2);
  EXPECT_EQ(plan_of_step_3(loader), "1:336:0 1:1479:0 1:2063:0 1:60:0 0:1042:0 0:4601:0 0:1236:0 1:1143:0 ");
  DataLoader old(config, 8);
  old.load_state(version1_ledger(old));
  EXPECT_EQ(old.data_order_version(), 1);
  EXPECT_EQ(plan_of_step_3(old), "0:3195:0 0:270:0 0:4934:0 1:1977:0 0:3252:0 1:989:0 0:9:0 0:1477:0 ");
}

TEST(DataLoader, SeekEqualsSequentialAdvance) {
  keel::Config config = two_sources();
  config.data.schedule = "0:prose=0.8,code=0.2;37:prose=0.2,code=0.8";
  config.data.skip = "prose:chunk:2;code:samples:10-50";
  DataLoader sequential(config, 32);
  std::vector<BatchPlan> plans;
  for (int i = 0; i < 200; ++i) plans.push_back(sequential.plan_next());  // wraps code's epoch
  DataLoader seeker(config, 32);
  for (int64_t n : {0, 1, 36, 37, 38, 150, 199, 5, 0}) {
    seeker.seek(n);
    EXPECT_EQ(seeker.step(), n);
    ASSERT_TRUE(same(seeker.plan_next(), plans[n])) << "step " << n;
  }
}

TEST(DataLoader, LedgerResumesExactly) {
  keel::Config config = two_sources();
  config.data.skip = "code:chunk:1";
  DataLoader a(config, 24);
  for (int i = 0; i < 77; ++i) a.plan_next();
  a.set_mixture(90, "prose=0.1,code=0.9");
  a.add_skip(100, "prose:samples:0-999");
  const json ledger = json::parse(a.state().dump());  // through text, as in a checkpoint
  EXPECT_EQ(ledger["step"], 77);
  EXPECT_EQ(ledger["mixture_history"].size(), 2u);
  EXPECT_EQ(ledger["skip"].size(), 2u);

  DataLoader b(config, 24);
  b.load_state(ledger);
  EXPECT_EQ(b.step(), 77);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(same(a.plan_next(), b.plan_next())) << "step " << 77 + i;
  // The history makes seek exact too.
  DataLoader c(config, 24);
  c.load_state(ledger);
  c.seek(150);
  DataLoader d(config, 24);
  d.load_state(ledger);
  for (int i = 77; i < 150; ++i) d.plan_next();
  ASSERT_TRUE(same(c.plan_next(), d.plan_next()));
}

TEST(DataLoader, LedgerRefusesOtherDataOrSettings) {
  keel::Config config = two_sources();
  DataLoader a(config, 8);
  a.plan_next();
  json ledger = a.state();
  keel::Config other = config;
  other.data.seed = 7;
  EXPECT_NE(error_of([&] { DataLoader(other, 8).load_state(ledger); }).find("seed 42 != data.seed 7"),
            std::string::npos);
  ledger["fingerprint"]["sources"][0]["tokens"] = 1;
  EXPECT_NE(error_of([&] { DataLoader(config, 8).load_state(ledger); }).find("other prepared data"), std::string::npos);
}

TEST(DataLoader, MixtureWeightsAreRespected) {
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.7,code=0.3";
  DataLoader loader(config, 100);
  int64_t prose = 0, total = 0;
  for (int s = 0; s < 200; ++s) {
    for (const auto& r : loader.plan_next().samples) {
      prose += r.source == 0;
      ++total;
    }
  }
  const double p = 0.7, sigma = std::sqrt(p * (1 - p) / total);
  EXPECT_NEAR(static_cast<double>(prose) / total, p, 4 * sigma);
}

TEST(DataLoader, DefaultMixtureIsProportionalToTokens) {
  keel::Config config = two_sources();  // 20001 vs 10001 tokens
  DataLoader loader(config, 100);
  const auto w = loader.weights_at(0);
  EXPECT_NEAR(w[0], 20001.0 / 30002.0, 1e-12);
  int64_t prose = 0, total = 0;
  for (int s = 0; s < 200; ++s) {
    for (const auto& r : loader.plan_next().samples) {
      prose += r.source == 0;
      ++total;
    }
  }
  const double sigma = std::sqrt(w[0] * w[1] / total);
  EXPECT_NEAR(static_cast<double>(prose) / total, w[0], 4 * sigma);
}

TEST(DataLoader, ScheduleSwitchNeitherRepeatsNorDrops) {
  keel::Config config = two_sources();
  config.data.schedule = "0:prose=0.9,code=0.1;50:prose=0.1,code=0.9";
  DataLoader loader(config, 32);
  std::map<int32_t, std::vector<SampleRef>> got;
  for (int s = 0; s < 100; ++s) {
    if (s == 70) loader.set_mixture(70, "prose=0.5,code=0.5");  // and a change made mid-run
    const BatchPlan plan = loader.plan_next();
    int code = 0;
    for (const auto& r : plan.samples) {
      got[r.source].push_back(r);
      code += r.source == 1;
    }
    if (s < 50) {
      EXPECT_LT(code, 12) << "step " << s;  // ~10% code
    } else if (s < 70) {
      EXPECT_GT(code, 20) << "step " << s;  // ~90% code
    }
  }
  for (int32_t src : {0, 1}) {
    const auto perm = keel::data::epoch_permutation(42, loader.source_names()[src], 0, loader.samples_per_epoch(src));
    ASSERT_LT(got[src].size(), perm.size());  // still in epoch 0
    std::set<int64_t> seen;
    for (size_t i = 0; i < got[src].size(); ++i) {
      EXPECT_EQ(got[src][i].sample_id, perm[i]) << "source " << src << " position " << i;
      EXPECT_EQ(got[src][i].epoch, 0);
      EXPECT_TRUE(seen.insert(got[src][i].sample_id).second);
    }
  }
}

TEST(DataLoader, SkipListIsHonoured) {
  keel::Config config = two_sources();
  config.data.skip = "prose:chunk:3;code:samples:100-200";
  DataLoader loader(config, 50);
  auto got = drain(loader, 400);  // 20000 samples: both sources wrap epochs
  ASSERT_GT(got[0].back().epoch, 0);
  ASSERT_GT(got[1].back().epoch, 1);
  // prose: exactly each epoch's order with the positions of chunk 3 (positions [1500, 2000)) removed.
  const int64_t n = loader.samples_per_epoch(0);
  std::vector<int64_t> expected;
  for (int64_t e = 0; e <= got[0].back().epoch; ++e) {
    const auto perm = keel::data::epoch_permutation(42, "prose", e, n);
    for (int64_t p = 0; p < n; ++p) {
      if (p * 10 / n != 3) expected.push_back(perm[p]);
    }
  }
  for (size_t i = 0; i < got[0].size(); ++i) {
    ASSERT_NE(got[0][i].chunk, 3);
    ASSERT_EQ(got[0][i].sample_id, expected[i]) << "prose sample " << i;
  }
  for (const auto& r : got[1]) ASSERT_FALSE(r.sample_id >= 100 && r.sample_id <= 200) << r.sample_id;
  const json ledger = loader.state();
  EXPECT_GT(ledger["sources"][1]["skipped"].get<int64_t>(), 0);
}

TEST(DataLoader, SkipListThatRemovesEverythingIsAnError) {
  keel::Config config = two_sources();
  config.data.skip = "code:chunk:0-9";
  config.data.mixture = "code=1";
  DataLoader loader(config, 4);
  EXPECT_NE(error_of([&] { loader.plan_next(); }).find("skip list leaves no sample of source code"), std::string::npos);
}

// A range up to the largest id must not overflow where the loader computes the end of a skipped chunk range
// (r.last + 1 once overflowed int64 there; under scripts/asan.sh UBSan fails this test if that comes back).
TEST(DataLoader, SkipRangeUpToInt64MaxIsHonoured) {
  keel::Config config = two_sources();
  config.data.skip = "prose:chunk:5-9223372036854775807;code:samples:2000-9223372036854775807";
  DataLoader loader(config, 50);
  auto got = drain(loader, 100);
  ASSERT_FALSE(got[0].empty());
  for (const auto& r : got[0]) ASSERT_LT(r.chunk, 5);
  for (const auto& r : got[1]) ASSERT_LT(r.sample_id, 2000);
}

TEST(DataLoader, EpochWrapGivesANewPermutation) {
  keel::Config config = make_data({{"tiny", {101}}});  // 25 samples
  DataLoader loader(config, 5);
  auto got = drain(loader, 12)[0];  // 60 samples: epochs 0, 1 and 10 of epoch 2
  std::vector<int64_t> e0, e1;
  for (const auto& r : got) {
    if (r.epoch == 0) e0.push_back(r.sample_id);
    if (r.epoch == 1) e1.push_back(r.sample_id);
  }
  ASSERT_EQ(e0.size(), 25u);
  ASSERT_EQ(e1.size(), 25u);
  EXPECT_EQ(e0, keel::data::epoch_permutation(42, "tiny", 0, 25));
  EXPECT_EQ(e1, keel::data::epoch_permutation(42, "tiny", 1, 25));
  EXPECT_NE(e0, e1);
  EXPECT_EQ(std::set<int64_t>(e1.begin(), e1.end()).size(), 25u);  // each id once per epoch
  EXPECT_EQ(got.back().epoch, 2);
}

TEST(DataLoader, ChunksCutTheEpochOrderIntoEqualParts) {
  keel::Config config = make_data({{"tiny", {101}}});  // 25 samples, 10 chunks
  DataLoader loader(config, 25);
  const auto plan = loader.plan_next();
  for (int64_t p = 0; p < 25; ++p) EXPECT_EQ(plan.samples[p].chunk, p * 10 / 25);
}

TEST(DataLoader, AdoptConfigChangesOnlyTheFuture) {
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.7,code=0.3";
  config.train.micro_batch = 16;  // the loaders' global batch: adopt_config follows the config's
  DataLoader a(config, 16);
  for (int i = 0; i < 20; ++i) a.plan_next();
  const json ledger = a.state();

  keel::Config branch = config;
  branch.data.mixture = "prose=0.2,code=0.8";
  branch.data.skip = "prose:chunk:0";
  DataLoader b(branch, 16);
  b.load_state(ledger);
  EXPECT_EQ(b.weights_at(0)[0], 0.7);  // the ledger's history, not the branch config
  const auto changes = b.adopt_config(branch);
  ASSERT_EQ(changes.size(), 2u);
  EXPECT_NE(changes[0].find("mixture from step 20: prose=0.2,code=0.8 (was prose=0.7,code=0.3)"), std::string::npos)
      << changes[0];
  EXPECT_DOUBLE_EQ(b.weights_at(19)[0], 0.7);
  EXPECT_DOUBLE_EQ(b.weights_at(20)[0], 0.2);
  EXPECT_TRUE(b.adopt_config(branch).empty());  // idempotent
  // The branch's first 20 steps replay as the parent's.
  DataLoader c(branch, 16);
  c.load_state(b.state());
  c.seek(19);
  DataLoader parent(config, 16);
  parent.seek(19);
  EXPECT_TRUE(same(c.plan_next(), parent.plan_next()));
}

// The concatenated sample stream of `steps` plans (source, sample id, epoch, chunk), and the global sample index
// each plan starts at must follow on from the previous plan's last.
std::vector<SampleRef> stream(DataLoader& loader, int64_t steps) {
  std::vector<SampleRef> out;
  int64_t next = -1;
  for (int64_t s = 0; s < steps; ++s) {
    const BatchPlan plan = loader.plan_next();
    if (next >= 0) {
      EXPECT_EQ(plan.first_sample, next) << "step " << plan.step;
    }
    next = plan.first_sample + static_cast<int64_t>(plan.samples.size());
    out.insert(out.end(), plan.samples.begin(), plan.samples.end());
  }
  return out;
}

bool same_stream(const std::vector<SampleRef>& a, const std::vector<SampleRef>& b, size_t n) {
  if (a.size() < n || b.size() < n) return false;
  for (size_t i = 0; i < n; ++i) {
    if (a[i].source != b[i].source || a[i].sample_id != b[i].sample_id || a[i].epoch != b[i].epoch ||
        a[i].chunk != b[i].chunk)
      return false;
  }
  return true;
}

TEST(DataLoader, BatchScheduleReadsTheConstantBatchStream) {
  // Batch-size warm-up 8 -> 16 -> 24: the samples, concatenated, are the constant-batch run's, none lost or
  // repeated (the pick is a function of the global sample index); each step reads its stage's batch.
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.6,code=0.4";
  DataLoader constant(config, 8);
  const std::vector<SampleRef> want = stream(constant, 100);  // 800 samples, more than the warm-up reads
  config.train.micro_batch = 8;
  config.train.grad_accum = 1;
  config.train.batch_schedule = "0:8;5:16;9:24";
  DataLoader warmup(config, 8);
  std::vector<int64_t> sizes;
  std::vector<SampleRef> got;
  for (int64_t s = 0; s < 20; ++s) {
    EXPECT_EQ(warmup.global_batch(), s < 5 ? 8 : s < 9 ? 16 : 24) << "step " << s;
    const BatchPlan plan = warmup.plan_next();
    EXPECT_EQ(plan.first_sample, static_cast<int64_t>(got.size())) << "step " << s;
    sizes.push_back(static_cast<int64_t>(plan.samples.size()));
    got.insert(got.end(), plan.samples.begin(), plan.samples.end());
  }
  EXPECT_EQ(sizes[4], 8);
  EXPECT_EQ(sizes[5], 16);
  EXPECT_EQ(sizes[19], 24);
  EXPECT_EQ(got.size(), 5u * 8 + 4 * 16 + 11 * 24);
  EXPECT_TRUE(same_stream(got, want, got.size()));
  // seek() replays the schedule; the ledger records it and a loader restores it.
  DataLoader seeker(config, 8);
  seeker.seek(12);
  DataLoader sequential(config, 8);
  for (int i = 0; i < 12; ++i) sequential.plan_next();
  EXPECT_TRUE(same(seeker.plan_next(), sequential.plan_next()));
  const json ledger = json::parse(warmup.state().dump());
  ASSERT_TRUE(ledger.contains("batch_history"));
  EXPECT_EQ(ledger["batch_history"].size(), 3u);
  EXPECT_EQ(ledger["global_batch"], 24);
  keel::Config plain = two_sources();
  plain.data.mixture = "prose=0.6,code=0.4";
  DataLoader restored(plain, 8);
  restored.load_state(ledger);
  EXPECT_EQ(restored.global_batch(), 24);
  EXPECT_EQ(restored.global_batch_at(6), 16);
  EXPECT_TRUE(same(restored.plan_next(), warmup.plan_next()));
  // A constant batch writes no history: ledgers of such runs stay as they were.
  EXPECT_FALSE(constant.state().contains("batch_history"));
}

TEST(DataLoader, ResumeWithAnotherBatchContinuesFromTheNextSample) {
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.5,code=0.5";
  config.data.schedule = "0:prose=0.5,code=0.5;30:prose=0.2,code=0.8";  // the weights stay by step
  config.train.micro_batch = 4;
  config.train.grad_accum = 2;
  DataLoader parent(config, config.global_batch());
  for (int i = 0; i < 10; ++i) parent.plan_next();
  const json ledger = json::parse(parent.state().dump());

  keel::Config bigger = config;
  bigger.train.grad_accum = 6;  // 24 sequences from the resume on
  DataLoader child(bigger, bigger.global_batch());
  child.load_state(ledger);
  EXPECT_EQ(child.global_batch(), 8) << "the ledger's batch until the config is adopted";
  const auto changes = child.adopt_config(bigger);
  ASSERT_EQ(changes.size(), 1u);
  EXPECT_EQ(changes[0], "global batch from step 10: 24 sequences (was 8)");
  EXPECT_TRUE(child.adopt_config(bigger).empty());  // idempotent
  EXPECT_EQ(child.global_batch_at(9), 8);
  EXPECT_EQ(child.global_batch(), 24);
  EXPECT_EQ(child.batch_history().back().origin, "train.micro_batch x train.grad_accum (adopted at resume)");
  // Steps 10..14 at 24 sequences read exactly the samples 80..199 of the constant run (weights before step 30 are
  // those of the constant run).
  DataLoader constant(config, 8);
  constant.seek(10);
  const std::vector<SampleRef> want = stream(constant, 15);
  const std::vector<SampleRef> got = stream(child, 5);
  ASSERT_EQ(got.size(), 120u);
  EXPECT_TRUE(same_stream(got, want, got.size()));
  // The recorded history replays the whole run: step 12 as the child planned it.
  DataLoader replay(config, 8);
  replay.load_state(child.state());
  replay.seek(12);
  DataLoader child_again(bigger, 24);
  child_again.load_state(ledger);
  child_again.adopt_config(bigger);
  child_again.plan_next();
  child_again.plan_next();
  EXPECT_TRUE(same(replay.plan_next(), child_again.plan_next()));
  // A resume back to the old batch ends the change; a schedule adopted at resume keeps its later stages.
  keel::Config warmup = config;
  warmup.train.batch_schedule = "0:8;12:16;14:32";
  DataLoader scheduled(warmup, 8);
  scheduled.load_state(ledger);
  const auto lines = scheduled.adopt_config(warmup);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], "global batch from step 10: 8 sequences, as before, 16 from step 12, 32 from step 14");
  EXPECT_EQ(scheduled.global_batch_at(13), 16);
  EXPECT_EQ(scheduled.global_batch_at(20), 32);
}

TEST(DataLoader, ABatchHistoryThatDoesNotStartAtStepZeroIsRefused) {
  keel::Config config = two_sources();
  config.train.micro_batch = 8;
  config.train.batch_schedule = "0:8;2:16";
  DataLoader a(config, 8);
  json ledger = a.state();
  ledger["batch_history"][0]["from_step"] = 1;
  EXPECT_NE(error_of([&] { DataLoader(config, 8).load_state(ledger); }).find("batch_history must start at step 0"),
            std::string::npos);
  ledger = a.state();
  ledger["batch_history"][1]["global_batch"] = 0;
  EXPECT_NE(error_of([&] { DataLoader(config, 8).load_state(ledger); }).find("batches >= 1"), std::string::npos);
  // A loader whose schedule starts at another batch than the one it is given.
  EXPECT_NE(error_of([&] { DataLoader(config, 4); }).find("train.batch_schedule starts at a global batch of 8, not 4"),
            std::string::npos);
}

TEST(DataLoader, RefusesChangingThePast) {
  keel::Config config = two_sources();
  DataLoader loader(config, 8);
  for (int i = 0; i < 10; ++i) loader.plan_next();
  EXPECT_NE(error_of([&] { loader.set_mixture(5, "prose=1"); }).find("already planned up to step 10"),
            std::string::npos);
  EXPECT_NE(error_of([&] { loader.set_mixture(10, "poetry=1"); }).find("unknown source 'poetry'"), std::string::npos);
}

TEST(DataMixture, ParsesAndRejects) {
  const std::vector<std::string> names = {"prose", "code"};
  EXPECT_EQ(keel::data::parse_weights("prose=0.7, code=0.3", names, "k"), (std::vector<double>{0.7, 0.3}));
  EXPECT_EQ(keel::data::parse_weights("code=2", names, "k"), (std::vector<double>{0, 2}));
  const auto stages = keel::data::parse_schedule("500:prose=1;0:code=1", names, "data.schedule");
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0].from_step, 0);
  EXPECT_EQ(stages[1].from_step, 500);
  const auto rules = keel::data::parse_skip("prose:chunk:3; code:samples:100-200", names, 0, "data.skip");
  ASSERT_EQ(rules.size(), 2u);
  EXPECT_EQ(rules[1].first, 100);
  EXPECT_EQ(rules[1].last, 200);
  EXPECT_EQ(rules[1].spec, "code:samples:100-200");
  // prose=1e308,code=1e308: each weight is finite but the sum is not (tests/fuzz/fuzz_config checks this).
  for (const char* bad :
       {"prose", "prose=-1", "prose=0", "x=1", "prose=1,prose=2", "prose=abc", "prose=1e308,code=1e308"}) {
    EXPECT_NE(error_of([&] { keel::data::parse_weights(bad, names, "data.mixture"); }).find("data.mixture: "),
              std::string::npos)
        << bad;
  }
  for (const char* bad : {"prose:chunk", "prose:pages:1", "prose:chunk:5-3", "prose:chunk:x", "x:chunk:1"}) {
    EXPECT_NE(error_of([&] { keel::data::parse_skip(bad, names, 0, "data.skip"); }).find("data.skip: "),
              std::string::npos)
        << bad;
  }
  EXPECT_NE(error_of([&] { keel::data::parse_schedule("0:prose=1;0:code=1", names, "s"); }).find("two stages"),
            std::string::npos);
}

// ------------------------------------------------------------------------------------- data-order version 2

TEST(DataOrder, GumbelPickFrequenciesMatchTheWeights) {
  const std::vector<std::string> names = {"prose", "code", "wiki"};
  const std::vector<double> w = {0.2, 0.5, 0.3};
  std::vector<int64_t> count(3, 0);
  const int64_t steps = 2000, slots = 30;  // 60000 picks
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t slot = 0; slot < slots; ++slot) ++count[keel::data::gumbel_pick(42, step, slot, names, w)];
  }
  double chi2 = 0;
  for (size_t i = 0; i < 3; ++i) {
    const double expected = w[i] * steps * slots;
    chi2 += (count[i] - expected) * (count[i] - expected) / expected;
  }
  EXPECT_LT(chi2, 13.8) << "2 degrees of freedom, p = 0.001: " << count[0] << " " << count[1] << " " << count[2];
  // A zero weight is never picked; weights at any scale pick alike; no positive weight is an error.
  for (int64_t slot = 0; slot < 1000; ++slot) {
    EXPECT_NE(keel::data::gumbel_pick(42, 7, slot, names, {0.5, 0, 0.5}), 1);
    EXPECT_EQ(keel::data::gumbel_pick(42, 7, slot, names, w), keel::data::gumbel_pick(42, 7, slot, names, {2, 5, 3}));
  }
  EXPECT_NE(error_of([&] {
              keel::data::gumbel_pick(42, 0, 0, names, {0, 0, 0});
            }).find("no source has a positive"),
            std::string::npos);
}

TEST(DataOrder, SectionOrderDoesNotChangeThePicks) {
  // The same corpus prepared with its sections in the other order: every slot draws the same source and sample.
  keel::Config a = make_data({{"prose", {12000, 8001}}, {"code", {10001}}, {"wiki", {6001}}});
  keel::Config b = make_data({{"wiki", {6001}}, {"code", {10001}}, {"prose", {12000, 8001}}});
  a.data.mixture = "prose=0.5,code=0.2,wiki=0.3";
  b.data.mixture = "wiki=0.3,prose=0.5,code=0.2";
  DataLoader la(a, 32), lb(b, 32);
  for (int step = 0; step < 50; ++step) {
    const BatchPlan pa = la.plan_next(), pb = lb.plan_next();
    for (size_t j = 0; j < pa.samples.size(); ++j) {
      ASSERT_EQ(la.source_names()[pa.samples[j].source], lb.source_names()[pb.samples[j].source]) << step << "/" << j;
      ASSERT_EQ(pa.samples[j].sample_id, pb.samples[j].sample_id) << step << "/" << j;
    }
  }
}

TEST(DataOrder, ArmsWithDifferentMixturesShareMostSources) {
  // 0.5/0.5 vs 0.3/0.7: the exact share is 1/(1 + 7/3) + 1/(1 + 1) = 0.3 + 0.5 = 0.8 = 1 - TV.
  EXPECT_NEAR(keel::data::expected_same_source_share({0.5, 0.5}, {0.3, 0.7}), 0.8, 1e-12);
  EXPECT_NEAR(keel::data::expected_same_source_share({1, 1}, {3, 7}), 0.8, 1e-12);  // scale-free
  EXPECT_NEAR(keel::data::expected_same_source_share({0.2, 0.5, 0.3}, {0.2, 0.5, 0.3}), 1.0, 1e-12);
  EXPECT_NEAR(keel::data::expected_same_source_share({1, 0}, {0, 1}), 0.0, 1e-12);
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.5,code=0.5";
  keel::Config other = config;
  other.data.mixture = "prose=0.3,code=0.7";
  DataLoader a(config, 64), b(other, 64);
  const auto na = picked_names(a, 200), nb = picked_names(b, 200);  // 12800 slots
  int64_t same_source = 0;
  for (size_t i = 0; i < na.size(); ++i) same_source += na[i] == nb[i];
  const double share = static_cast<double>(same_source) / na.size(), sigma = std::sqrt(0.8 * 0.2 / na.size());
  EXPECT_NEAR(share, 0.8, 4 * sigma) << same_source << " of " << na.size();
  // Three sources, one of them unchanged (wiki): the exact formula and the observed share agree, and wiki keeps
  // most of its slots wherever its section sits.
  keel::Config three = make_data({{"prose", {12000, 8001}}, {"wiki", {6001}}, {"code", {10001}}});
  three.data.mixture = "prose=0.5,wiki=0.2,code=0.3";
  keel::Config three_b = three;
  three_b.data.mixture = "prose=0.2,wiki=0.2,code=0.6";
  const double expected = keel::data::expected_same_source_share({0.5, 0.2, 0.3}, {0.2, 0.2, 0.6});
  DataLoader c(three, 64), d(three_b, 64);
  const auto nc = picked_names(c, 200), nd = picked_names(d, 200);
  int64_t same3 = 0, wiki_a = 0, wiki_both = 0;
  for (size_t i = 0; i < nc.size(); ++i) {
    same3 += nc[i] == nd[i];
    wiki_a += nc[i] == "wiki";
    wiki_both += nc[i] == "wiki" && nd[i] == "wiki";
  }
  EXPECT_NEAR(static_cast<double>(same3) / nc.size(), expected, 4 * std::sqrt(expected * (1 - expected) / nc.size()));
  EXPECT_GT(static_cast<double>(wiki_both) / wiki_a, 0.5) << wiki_both << " of " << wiki_a;
}

TEST(DataOrder, LedgerRecordsTheVersionAndOldLedgersKeepTheOldPick) {
  keel::Config config = two_sources();
  config.data.mixture = "prose=0.6,code=0.4";
  DataLoader fresh(config, 8);
  EXPECT_EQ(fresh.state().at("data_order_version"), 2);
  // Version 1 (an old checkpoint): resumed, its plans are the inverse-CDF ones, and its ledger says so again.
  DataLoader old(config, 8);
  old.load_state(version1_ledger(old));
  for (int i = 0; i < 5; ++i) old.plan_next();
  const json ledger = json::parse(old.state().dump());
  EXPECT_EQ(ledger.at("data_order_version"), 1);
  DataLoader resumed(config, 8);
  resumed.load_state(ledger);
  EXPECT_EQ(resumed.data_order_version(), 1);
  for (int i = 0; i < 5; ++i) {
    const BatchPlan p = resumed.plan_next();
    const auto cdf0 = 0.6;
    for (size_t j = 0; j < p.samples.size(); ++j) {
      const double u = keel::data::source_pick_uniform(42, p.first_sample + static_cast<int64_t>(j));
      EXPECT_EQ(p.samples[j].source, u < cdf0 ? 0 : 1) << "step " << p.step << " slot " << j;
    }
  }
  // Version 2 resumed: the Gumbel-max picks.
  for (int i = 0; i < 5; ++i) fresh.plan_next();
  DataLoader resumed2(config, 8);
  resumed2.load_state(json::parse(fresh.state().dump()));
  const BatchPlan p = resumed2.plan_next();
  for (size_t j = 0; j < p.samples.size(); ++j) {
    EXPECT_EQ(p.samples[j].source,
              keel::data::gumbel_pick(42, 5, static_cast<int64_t>(j), {"prose", "code"}, {0.6, 0.4}));
  }
  json future = fresh.state();
  future["data_order_version"] = 3;
  EXPECT_NE(error_of([&] {
              DataLoader(config, 8).load_state(future);
            }).find("data ledger: data_order_version 3 is not known to this Keel (it knows 1..2)"),
            std::string::npos);
}

// ------------------------------------------------------------------------------------ cumulative skip rules

TEST(SkipRules, ARollbackKeepsTheRulesItsCheckpointLacks) {
  keel::Config config = two_sources();
  config.data.skip = "code:chunk:1";
  DataLoader live(config, 16);
  for (int i = 0; i < 10; ++i) live.plan_next();
  const json checkpoint_10 = json::parse(live.state().dump());
  // Rollback 1 to step 10 skips some prose; training goes on to step 14, rollback 2 reloads checkpoint 10.
  live.add_skip(10, "prose:samples:5-9", "rollback at step 12 by rollback_skip");
  for (int i = 0; i < 4; ++i) live.plan_next();
  const json before = live.state().at("skip");
  live.load_state(checkpoint_10);
  ASSERT_EQ(live.skip_rules().size(), 1u) << "the checkpoint's own rule only";
  const auto kept = live.carry_skip(before, /*from_now=*/true);
  ASSERT_EQ(kept.size(), 1u);
  EXPECT_EQ(kept[0], "skip prose:samples:5-9 from step 10 (kept: rollback at step 12 by rollback_skip)");
  ASSERT_EQ(live.skip_rules().size(), 2u);
  EXPECT_EQ(live.skip_rules()[1].from_step, 10);
  EXPECT_TRUE(live.carry_skip(before, true).empty()) << "carrying twice adds nothing";
  // A rule from a later step is carried from the rollback step (from_now), or kept at its step (a resume).
  json later = json::array({{{"spec", "code:samples:0-3"}, {"from_step", 30}, {"to_step", -1}, {"origin", "r"}},
                            {{"spec", "code:samples:7"}, {"from_step", 0}, {"to_step", 5}, {"origin", "r"}},
                            {{"spec", "code:samples:8"}, {"from_step", 0}, {"to_step", 40}, {"origin", "r"}}});
  DataLoader resumed(config, 16);
  resumed.load_state(checkpoint_10);
  const auto carried = resumed.carry_skip(later, /*from_now=*/false);
  ASSERT_EQ(carried.size(), 2u) << "a rule over before step 10 is history";
  EXPECT_EQ(resumed.skip_rules()[1].from_step, 30);
  EXPECT_EQ(resumed.skip_rules()[2].from_step, 10);
  EXPECT_EQ(resumed.skip_rules()[2].to_step, 40);
  DataLoader rolled(config, 16);
  rolled.load_state(checkpoint_10);
  rolled.carry_skip(later, /*from_now=*/true);
  EXPECT_EQ(rolled.skip_rules()[1].from_step, 10);
  // Bad input: an unknown source or a malformed list changes nothing.
  EXPECT_NE(error_of([&] {
              rolled.carry_skip(json::array({{{"spec", "poetry:chunk:1"}, {"from_step", 0}, {"to_step", -1}}}), true);
            }).find("unknown source 'poetry'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              rolled.carry_skip(json::array({{{"spec", "code:chunk:1"}}}), true);
            }).find("skip rules to carry: malformed"),
            std::string::npos);
  EXPECT_EQ(rolled.skip_rules().size(), 3u);
}

TEST(SkipRules, TheReplayAfterARollbackNeverDrawsASkippedSample) {
  // Three rollbacks to the same step, each skipping the batch that followed: with every rule kept, the batch of
  // step 11 is new each time (the bug: rollback 2 forgot rule 1 and drew the original batch again).
  keel::Config config = two_sources();
  DataLoader live(config, 16);
  for (int i = 0; i < 10; ++i) live.plan_next();
  const json checkpoint_10 = json::parse(live.state().dump());
  std::set<std::pair<int32_t, int64_t>> skipped;
  for (int rollback = 0; rollback < 3; ++rollback) {
    live.plan_next();                        // step 10
    const BatchPlan bad = live.plan_next();  // step 11: the spike
    std::string spec;
    for (const auto& s : bad.samples) {
      EXPECT_TRUE(skipped.insert({s.source, s.sample_id}).second) << "rollback " << rollback << " replayed a sample";
      spec += (spec.empty() ? "" : ";") + live.source_names()[s.source] + ":samples:" + std::to_string(s.sample_id);
    }
    const json before = live.state().at("skip");
    live.load_state(checkpoint_10);
    live.carry_skip(before, true);
    live.add_skip(10, spec, "rollback at step 11 by test");
  }
  EXPECT_EQ(live.skip_rules().size(), 48u);
}

TEST(SkipRules, AdoptConfigEndsOnlyTheConfigsRules) {
  keel::Config config = two_sources();
  config.data.skip = "code:chunk:1";
  config.train.micro_batch = 16;  // the loaders' global batch: adopt_config follows the config's
  DataLoader a(config, 16);
  for (int i = 0; i < 10; ++i) a.plan_next();
  a.add_skip(10, "prose:chunk:2", "rollback at step 12 by rollback_skip");
  const json ledger = json::parse(a.state().dump());
  EXPECT_EQ(ledger.at("skip")[1].at("origin"), "rollback at step 12 by rollback_skip");
  keel::Config branch = config;
  branch.data.skip = "";
  DataLoader b(branch, 16);
  b.load_state(ledger);
  const auto changes = b.adopt_config(branch);
  ASSERT_EQ(changes.size(), 1u);
  EXPECT_EQ(changes[0], "skip code:chunk:1 ends at step 10");
  ASSERT_EQ(b.skip_rules().size(), 2u);
  EXPECT_EQ(b.skip_rules()[1].spec, "prose:chunk:2");
  EXPECT_EQ(b.skip_rules()[1].to_step, -1) << "a rollback's rule stays in force";
  // A ledger from before rules recorded their origin: a rule from step 0 is the config's, a later one is kept.
  DataLoader c(branch, 16);
  c.load_state(version1_ledger(a));
  const auto old_changes = c.adopt_config(branch);
  ASSERT_EQ(old_changes.size(), 1u);
  EXPECT_EQ(old_changes[0], "skip code:chunk:1 ends at step 10");
  EXPECT_EQ(c.skip_rules()[1].to_step, -1);
}

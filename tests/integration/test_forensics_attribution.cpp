// Why: `keel forensics` must find the samples a spike came from and `keel resume --skip-list` must remove them,
// end to end through the `keel` binary. A tiny pre-tokenized corpus makes the planted spike exact: one source whose
// clean tokens count up (a pattern the model learns in a few steps), 512 samples of 16 tokens cut into 128 chunks of
// 4 positions, and a batch of 8, so step s reads chunks 2s and 2s+1 of the epoch's order. The 4 samples of chunk 2S
// (read from the loader's own permutation) hold random ids the clean data never uses: step S spikes. One run (24
// steps, checkpoints every 4) is shared by every test; forensics replays 20..22 from step 20's checkpoint, with the
// detector's rule over the last 10 logged steps.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/data/loader.h"
#include "core/metrics/metrics_reader.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kSeq = 16, kSamples = 512, kChunks = 128, kBatch = 8, kSpike = 22;
constexpr uint64_t kDataSeed = 42;

struct Planted {
  std::string dir, config, run;
  std::vector<int64_t> order;  // epoch 0's permutation of sample ids
  std::set<int64_t> bad;       // the planted samples: chunk 2 * kSpike
};

json parse_json(const std::string& output) {
  const size_t brace = output.find('{');
  if (brace == std::string::npos) return json();
  return json::parse(output.substr(brace), nullptr, false);
}

// The corpus, its config, and the trained run (once per test binary).
const Planted& planted() {
  static const Planted p = [] {
    Planted p;
    p.dir = fresh_dir("forensics-attribution");
    fs::create_directories(p.dir);
    p.order = data::epoch_permutation(kDataSeed, "web", 0, kSamples);
    const int64_t first = 2 * kSpike * (kSamples / kChunks);  // chunk 2S's first position
    for (int64_t k = 0; k < kSamples / kChunks; ++k) p.bad.insert(p.order[static_cast<size_t>(first + k)]);
    std::vector<uint16_t> tokens(static_cast<size_t>(kSamples * kSeq + 1));
    for (size_t k = 0; k < tokens.size(); ++k) tokens[k] = static_cast<uint16_t>(2 + k % 60);  // counts up, ids 2..61
    uint64_t x = 7;
    for (int64_t id : p.bad) {
      for (int64_t k = 1; k <= kSeq; ++k) {  // the targets of sample id: ids 64..127, never seen otherwise
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        tokens[static_cast<size_t>(id * kSeq + k)] = static_cast<uint16_t>(64 + (x >> 33) % 64);
      }
    }
    std::ofstream(p.dir + "/web.u16", std::ios::binary)
        .write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 2));
    p.config = p.dir + "/planted.ini";
    std::ofstream(p.config)
        << "[model]\nlayers = 2\nd_model = 32\nheads = 4\nkv_heads = 2\nffn_hidden = 64\n"
           "vocab = 128\nseq_len = "
        << kSeq
        << "\n[train]\nsteps = 24\nmicro_batch = 4\ngrad_accum = 2\nthreads = 1\nlog_every = 100\n"
           "precision = fp32\n[optim]\nlr = 3e-2\nmin_lr = 1e-3\nwarmup_steps = 2\ndecay_steps = 24\n"
           "[data]\ndir = prepared\neos_id = 1\nseed = "
        << kDataSeed << "\nchunks = " << kChunks
        << "\n[checkpoint]\nevery = 4\n[source.web]\nformat = npy\ndtype = uint16\ninputs = web.u16\n"
           "heldout = 0\n";
    ProcessResult r = run_keel("data prepare --config " + p.config);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    p.run = p.dir + "/run";
    r = run_keel("train --config " + p.config + " --run-dir " + p.run);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return p;
  }();
  return p;
}

// `keel forensics RUN --step S --json`, once.
const json& forensics_result() {
  static const json j = [] {
    // The detector's rule over the last 10 steps: the default window of 50 would hold the first steps' fast descent,
    // whose spread lets a step with one bad sample through.
    const ProcessResult r = run_keel("forensics " + planted().run + " --step " + std::to_string(kSpike) +
                                     " --window 10 --min-history 10 --json");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return parse_json(r.output);
  }();
  return j;
}

std::map<int64_t, double> losses(const std::string& run) {
  const metrics::MetricsReader reader(run + "/metrics.h5");
  const auto step = reader.read_int64("/train/step");
  const auto loss = reader.read_double("/train/loss");
  std::map<int64_t, double> out;
  for (size_t i = 0; i < step.size(); ++i) out[step[i]] = loss[i];
  return out;
}

void the_planted_chunk_spikes_the_run() {
  const auto loss = losses(planted().run);
  ASSERT_TRUE(loss.count(kSpike));
  EXPECT_GT(loss.at(kSpike), 2.0 * loss.at(kSpike - 1)) << "no spike at the planted step";
}

void replay_matches_and_ranks_the_planted_samples_first() {
  const json& j = forensics_result();
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("step"), kSpike);
  EXPECT_EQ(j.at("replay_matches"), true) << j.dump(1);
  const json& samples = j.at("samples");
  ASSERT_EQ(samples.size(), static_cast<size_t>(kBatch));
  const auto& bad = planted().bad;
  for (size_t r = 0; r < samples.size(); ++r) {
    const json& s = samples[r];
    EXPECT_EQ(s.at("source"), "web");
    for (const char* key : {"sample_id", "loss", "grad_norm"}) EXPECT_TRUE(s.contains(key)) << key;
    EXPECT_EQ(bad.count(s.at("sample_id").get<int64_t>()) > 0, r < bad.size()) << "rank " << r << ": " << s.dump();
  }
  // The attribution's full-batch values are the step's (fp32, one process: equal to rounding).
  EXPECT_NEAR(j.at("attributed").at("loss").get<double>(), j.at("logged").at("loss").get<double>(), 1e-4);
  EXPECT_NEAR(j.at("attributed").at("grad_norm").get<double>(), j.at("logged").at("grad_norm").get<double>(),
              1e-3 * j.at("logged").at("grad_norm").get<double>());
  // step-N.h5: one row per sample in /samples, the planted ones marked removed.
  const std::string h5 = planted().run + "/forensics/step-" + std::to_string(kSpike) + ".h5";
  const hid_t f = H5Fopen(h5.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0) << h5;
  const hid_t d = H5Dopen2(f, "/samples/removed", H5P_DEFAULT);
  ASSERT_GE(d, 0) << h5;
  std::vector<int64_t> removed(kBatch, -1);
  const hid_t space = H5Dget_space(d);
  EXPECT_EQ(H5Sget_simple_extent_npoints(space), kBatch);
  H5Dread(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, removed.data());
  H5Sclose(space);
  H5Dclose(d);
  H5Fclose(f);
  EXPECT_EQ(std::count(removed.begin(), removed.end(), 1), 4);
}

void the_skip_list_names_the_planted_chunk() {
  const json& j = forensics_result();
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("search").at("reached"), true) << j.dump(1);
  EXPECT_EQ(j.at("skip_rules"), json::array({"web:chunk:" + std::to_string(2 * kSpike)})) << j.dump(1);
  std::ifstream in(j.at("skip_list").get<std::string>());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\nweb:chunk:" + std::to_string(2 * kSpike) + "\n"), std::string::npos) << text;
}

void resuming_with_the_skip_list_removes_the_spike_and_skips_exactly_those_samples() {
  const json& j = forensics_result();
  ASSERT_TRUE(j.is_object());
  const std::string branch = planted().dir + "/skipped";
  const ProcessResult r = run_keel("resume --from " + planted().run + "/checkpoints/step-00000020 --run-dir " + branch +
                                   " --skip-list " + j.at("skip_list").get<std::string>() + " --set train.steps=23");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto before = losses(planted().run), after = losses(branch);
  ASSERT_TRUE(after.count(kSpike));
  EXPECT_LT(after.at(kSpike), 2.0 * before.at(kSpike - 1)) << "the spike is still there";
  EXPECT_LE(after.at(kSpike), j.at("threshold").at("max_loss").get<double>());
  // Step S reads positions 8S+4 .. 8S+11: chunk 2S passed over, nothing else lost or repeated.
  const metrics::MetricsReader reader(branch + "/metrics.h5");
  const auto by_step = reader.read_batches_by_step();
  ASSERT_TRUE(by_step.count(kSpike));
  std::vector<int64_t> got, want;
  for (const auto& row : by_step.at(kSpike)) got.push_back(row.sample_id);
  for (int64_t k = 0; k < kBatch; ++k) want.push_back(planted().order[static_cast<size_t>(kBatch * kSpike + 4 + k)]);
  EXPECT_EQ(got, want);
  // Recorded: the lineage names the file, skip_rules.json holds the rule.
  std::ifstream lineage(branch + "/lineage.json");
  const std::string lineage_text((std::istreambuf_iterator<char>(lineage)), std::istreambuf_iterator<char>());
  EXPECT_NE(lineage_text.find("skip list " + j.at("skip_list").get<std::string>()), std::string::npos) << lineage_text;
  const json rules = json::parse(std::ifstream(branch + "/skip_rules.json"));
  ASSERT_EQ(rules.at("skip").size(), 1u) << rules.dump();
  EXPECT_EQ(rules.at("skip")[0].at("spec"), "web:chunk:" + std::to_string(2 * kSpike));
  EXPECT_EQ(rules.at("skip")[0].at("from_step"), 20);
}

void bad_input_is_refused_naming_the_step_or_file() {
  const std::string& run = planted().run;
  ProcessResult r = run_keel("forensics " + run + " --step 999");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("logged no step 999"), std::string::npos) << r.output;
  r = run_keel("forensics " + run + " --step 2");  // the first checkpoint is step 4's
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no valid checkpoint at or before step 2"), std::string::npos) << r.output;
  r = run_keel("forensics " + run + " --step 5 --from " + run + "/checkpoints/step-00000024");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("after step 5"), std::string::npos) << r.output;
  r = run_keel("forensics " + run + " --step 22 --min-history 30");  // 22 steps of history: too few for it
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("fewer than --min-history 30"), std::string::npos) << r.output;
  r = run_keel("forensics " + planted().dir + "/nowhere --step 3");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("nowhere/metrics.h5"), std::string::npos) << r.output;
}

void a_bad_skip_list_is_refused_naming_file_and_line() {
  const std::string bad = planted().dir + "/bad.skip";
  std::ofstream(bad) << "# a comment\nweb:chunk:3\nweb:chunk:x\n";
  ProcessResult r = run_keel("resume --from " + planted().run + "/checkpoints/step-00000020 --run-dir " +
                             planted().dir + "/refused --skip-list " + bad);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(bad + ":3"), std::string::npos) << r.output;
  std::ofstream(bad) << "nope:chunk:1\n";
  r = run_keel("resume --from " + planted().run + "/checkpoints/step-00000020 --run-dir " + planted().dir +
               "/refused --skip-list " + bad);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(bad + ":1"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(planted().dir + "/refused/metrics.h5"));
}

// ctest runs each TEST in its own process, so the planted run (trained once per process) is shared by grouping
// the checks: one run for the spike found and skipped, one for the refusals.
TEST(ForensicsAttribution, FindsThePlantedChunkAndItsSkipListRemovesTheSpike) {
  the_planted_chunk_spikes_the_run();
  replay_matches_and_ranks_the_planted_samples_first();
  the_skip_list_names_the_planted_chunk();
  resuming_with_the_skip_list_removes_the_spike_and_skips_exactly_those_samples();
}

TEST(ForensicsAttribution, BadInputAndABadSkipListAreRefusedNamingStepFileAndLine) {
  bad_input_is_refused_naming_the_step_or_file();
  a_bad_skip_list_is_refused_naming_file_and_line();
}

TEST(ForensicsAttribution, HelpAndUsageErrors) {
  ProcessResult r = run_keel("forensics --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--step"), std::string::npos) << r.output;
  EXPECT_NE(run_keel("resume --help").output.find("--skip-list"), std::string::npos);
  for (const std::string args : {"forensics", "forensics --bogus", "forensics RUN"}) {
    r = run_keel(args);
    EXPECT_NE(r.exit_code, 0) << args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("keel forensics: error: ", 0), 0u) << args << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << "\n" << r.output;
  }
}

}  // namespace
}  // namespace keel::testing

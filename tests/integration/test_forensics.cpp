// Why: the forensics instruments, end to end through the `keel` binary on the tiny config: every step logs each
// sample's loss (aligned with /data/batch) and each source's mean, which average to the step's loss and are the
// same whole-batch values in a DP, TP or PP layout; `keel verify` replays logged steps from a checkpoint and reports
// bit-identity on an untouched run, the exact step of a value altered in metrics.h5, and a changed build
// (simulated by another precision); `resume.verify_steps` makes a resume check its first steps against the
// parent's rows. A 4-step fp32 run shared by the tests; each replay is 1-2 steps.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_store.h"
#include "core/metrics/metrics_reader.h"
#include "tests/integration/keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;
using metrics::MetricsReader;
using nlohmann::json;

const std::string kRun =
    "--set train.steps=4 --set train.precision=fp32 --set checkpoint.every=2 --set checkpoint.at_end=true";

std::string train_args(const std::string& dir, const std::string& extra = "") {
  return "train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + dir + " " + kRun + " " +
         extra;
}

// The run every test reads (trained once per test binary).
const std::string& base_run() {
  static const std::string dir = [] {
    const std::string d = fresh_dir("forensics-base");
    const ProcessResult r = run_keel(train_args(d));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return d;
  }();
  return dir;
}

// A copy of the base run whose /train/loss at row `row` is one ulp larger.
std::string altered_copy(const std::string& name, hsize_t row) {
  const std::string dir = fresh_dir(name);
  fs::copy(base_run(), dir, fs::copy_options::recursive);
  const std::string path = dir + "/metrics.h5";
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  const hid_t d = H5Dopen2(f, "/train/loss", H5P_DEFAULT);
  const hid_t space = H5Dget_space(d);
  const hsize_t one = 1;
  H5Sselect_hyperslab(space, H5S_SELECT_SET, &row, nullptr, &one, nullptr);
  const hid_t mem = H5Screate_simple(1, &one, nullptr);
  double value = 0;
  H5Dread(d, H5T_NATIVE_DOUBLE, mem, space, H5P_DEFAULT, &value);
  value = std::nextafter(value, 1e9);
  H5Dwrite(d, H5T_NATIVE_DOUBLE, mem, space, H5P_DEFAULT, &value);
  H5Sclose(mem);
  H5Sclose(space);
  H5Dclose(d);
  H5Fclose(f);
  return dir;
}

json parse_json(const std::string& output) {
  const size_t brace = output.find('{');
  if (brace == std::string::npos) return json();
  return json::parse(output.substr(brace), nullptr, false);
}

// Per step, the samples' losses in slot order (the run logs each step once: no rollbacks here).
std::map<int64_t, std::vector<double>> sample_losses(const std::string& run) {
  const MetricsReader reader(run + "/metrics.h5");
  const auto batch = reader.read_batch();
  const auto losses = reader.read_double("/data/sample_loss");
  EXPECT_EQ(batch.size(), losses.size());
  std::map<int64_t, std::vector<double>> out;
  for (size_t i = 0; i < batch.size() && i < losses.size(); ++i) out[batch[i].step].push_back(losses[i]);
  return out;
}

TEST(SampleLossRun, PerSampleLossesAverageToTheStepLossAndPerSourceMeansMatch) {
  const MetricsReader reader(base_run() + "/metrics.h5");
  const auto loss = reader.read_double("/train/loss");
  const auto steps = reader.read_int64("/train/step");
  const auto batch = reader.read_batch();
  const auto samples = reader.read_double("/data/sample_loss");
  const auto sources = reader.batch_sources();
  ASSERT_EQ(steps.size(), 4u);
  ASSERT_EQ(samples.size(), batch.size());
  ASSERT_EQ(batch.size(), 4u * 16u);  // 16 samples a step (micro_batch 8 x grad_accum 2)
  const auto source_loss = reader.read_matrix("/train/source_loss");
  ASSERT_EQ(reader.read_string_attribute("/train/source_loss", "names"), sources);
  ASSERT_EQ(source_loss.rows, 4);
  for (size_t r = 0; r < steps.size(); ++r) {
    double sum = 0;
    std::vector<double> by_source(sources.size(), 0.0);
    std::vector<int> count(sources.size(), 0);
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].step != steps[r]) continue;
      sum += samples[i];
      by_source[static_cast<size_t>(batch[i].source)] += samples[i];
      ++count[static_cast<size_t>(batch[i].source)];
    }
    // Every sample has seq_len target tokens: the token-weighted mean is the plain mean.
    EXPECT_NEAR(sum / 16.0, loss[r], 1e-6 * loss[r]) << "step " << steps[r];
    for (size_t s = 0; s < sources.size(); ++s) {
      const float got = source_loss.at(static_cast<int64_t>(r), static_cast<int64_t>(s));
      if (count[s] == 0) {
        EXPECT_TRUE(std::isnan(got)) << "step " << steps[r] << " source " << sources[s];
      } else {
        EXPECT_NEAR(got, by_source[s] / count[s], 1e-6 * std::abs(got)) << "step " << steps[r] << " " << sources[s];
      }
    }
  }
}

// A layout gives each sample the loss the single process gives it (the layout tests' fp32 tolerance).
void expect_same_sample_losses(const std::string& layout, const std::string& flags) {
  const std::string dir = fresh_dir("forensics-" + layout);
  const ProcessResult r = run_keel("launch --nproc 2 -- " + std::string(KEEL_BINARY) + " " +
                                   train_args(dir, flags + " --set train.steps=2 --set checkpoint.at_end=false"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto want = sample_losses(base_run()), got = sample_losses(dir);
  ASSERT_EQ(got.size(), 2u);
  for (const auto& [step, values] : got) {
    ASSERT_EQ(values.size(), want.at(step).size()) << "step " << step;
    for (size_t i = 0; i < values.size(); ++i)
      EXPECT_NEAR(values[i], want.at(step)[i], 1e-5 * want.at(step)[i]) << layout << " step " << step << " slot " << i;
  }
}

TEST(SampleLossRun, DataParallelGivesTheSameSampleLosses) { expect_same_sample_losses("dp2", "--set parallel.dp=2"); }

TEST(SampleLossRun, TensorParallelGivesTheSameSampleLosses) {
  expect_same_sample_losses("tp2", "--set parallel.tp=2");  // the vocabulary-parallel head's per-token losses
}

TEST(SampleLossRun, PipelineParallelGivesTheSameSampleLosses) {
  expect_same_sample_losses("pp2", "--set parallel.pp=2");
}

TEST(Verify, AnUntouchedRunReplaysBitForBit) {
  const ProcessResult r = run_keel("verify " + base_run() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = parse_json(r.output);
  // The newest valid checkpoint with logged steps after it: step-2 (step-4 is the end), every logged step after.
  EXPECT_EQ(j.at("steps_checked"), 2) << r.output;
  EXPECT_EQ(j.at("first_step"), 2);
  EXPECT_TRUE(j.at("first_mismatch").is_null());
  EXPECT_TRUE(j.at("identical").get<bool>());
  EXPECT_TRUE(j.at("replay_dir").is_null()) << "the replay is removed when identical";
  const ProcessResult text = run_keel("verify " + base_run() + " --steps 1");
  EXPECT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("steps 2..2 (1) replayed from"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("bit-identical"), std::string::npos) << text.output;
}

TEST(Verify, AValueAlteredInMetricsIsCaughtAtItsStep) {
  const std::string dir = altered_copy("forensics-altered", 3);  // row 3 = step 3
  const ProcessResult r = run_keel("verify " + dir + " --from " + dir + "/checkpoints/" + checkpoint::step_dir_name(2) +
                                   " --steps 2 --json");
  ASSERT_EQ(r.exit_code, 1) << r.output;
  const json j = parse_json(r.output);
  EXPECT_EQ(j.at("steps_checked"), 2);
  EXPECT_FALSE(j.at("identical").get<bool>());
  EXPECT_EQ(j.at("first_mismatch").at("step"), 3) << r.output;
  EXPECT_EQ(j.at("first_mismatch").at("what"), "loss");
  EXPECT_TRUE(fs::exists(j.at("replay_dir").get<std::string>() + "/metrics.h5")) << "kept for a look";
  const ProcessResult text = run_keel("verify " + dir);
  EXPECT_EQ(text.exit_code, 1);
  EXPECT_NE(text.output.find("step 3: loss differs"), std::string::npos) << text.output;
}

TEST(Verify, AChangedBuildIsCaughtAtTheFirstReplayedStep) {
  // Another precision stands in for a build that computes differently.
  const ProcessResult r = run_keel("verify " + base_run() + " --steps 1 --set train.precision=bf16-mixed --json");
  ASSERT_EQ(r.exit_code, 1) << r.output;
  const json j = parse_json(r.output);
  EXPECT_EQ(j.at("first_mismatch").at("step"), 2);
  EXPECT_EQ(j.at("first_mismatch").at("what"), "loss");
}

TEST(Verify, RefusesWhatItCannotCheckWithExit2) {
  ProcessResult r = run_keel("verify " + fresh_dir("forensics-none"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("keel verify: error:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("metrics.h5"), std::string::npos) << r.output;
  r = run_keel("verify " + base_run() + " --steps 3");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("logged only 2 consecutive steps from step 2"), std::string::npos) << r.output;
  r = run_keel("verify " + base_run() + " --steps 0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--steps must be >= 1"), std::string::npos) << r.output;
  r = run_keel("verify --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--steps"), std::string::npos) << r.output;
}

TEST(ResumeVerifySteps, AResumeChecksItsFirstStepsAgainstTheParentsRows) {
  const std::string ckpt = base_run() + "/checkpoints/" + checkpoint::step_dir_name(2);
  const std::string ok = fresh_dir("forensics-resume-ok");
  ProcessResult r = run_keel("resume --from " + ckpt + " --run-dir " + ok + " --set resume.verify_steps=2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  bool identical = false;
  for (const auto& e : MetricsReader(ok + "/metrics.h5").read_events())
    identical = identical || (e.kind == "verify" && e.text.find("steps 2..3 are bit-identical") != std::string::npos);
  EXPECT_TRUE(identical) << r.output;

  const std::string parent = altered_copy("forensics-resume-parent", 3);
  const std::string bad = fresh_dir("forensics-resume-bad");
  r = run_keel("resume --from " + parent + "/checkpoints/" + checkpoint::step_dir_name(2) + " --run-dir " + bad +
               " --set resume.verify_steps=2");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resume.verify_steps: step 3: loss differs"), std::string::npos) << r.output;

  r = run_keel("resume --from " + ckpt + " --run-dir " + fresh_dir("forensics-resume-neg") +
               " --set resume.verify_steps=-1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("resume.verify_steps must be >= 0"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace keel::testing

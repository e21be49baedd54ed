// Why: the spine end to end through the `keel` binary on the bundled corpus: loss falls, metrics.h5 holds every
// documented dataset, a SIGKILLed run leaves a readable file, SIGTERM stops cleanly, bad input is refused.
#include <gtest/gtest.h>
#include <signal.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <thread>

#include "core/metrics/metrics_reader.h"
#include "keel_process.h"

using keel::metrics::MetricsReader;
using namespace keel::testing;

namespace {

double mean(const std::vector<double>& v, size_t from, size_t to) {
  return std::accumulate(v.begin() + from, v.begin() + to, 0.0) / static_cast<double>(to - from);
}

}  // namespace

TEST(TrainRun, ThirtyStepsOnBundledCorpusLossFallsAndMetricsComplete) {
  const std::string run_dir = fresh_dir("train30");
  auto result = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir +
                         " --set train.steps=30");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("metrics:"), std::string::npos);

  MetricsReader reader(run_dir + "/metrics.h5");
  const auto steps = reader.read_int64("/train/step");
  ASSERT_EQ(steps.size(), 30u);
  for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int64_t>(i));
  const auto loss = reader.read_double("/train/loss");
  ASSERT_EQ(loss.size(), 30u);
  EXPECT_GT(loss.front(), 6.0);  // ~ln(2048) = 7.6 at init
  EXPECT_LT(mean(loss, 25, 30), mean(loss, 0, 5) - 0.5) << "loss did not fall";
  for (const char* name : {"/train/grad_norm", "/train/lr", "/train/tokens_per_s", "/train/step_time_s"})
    EXPECT_EQ(reader.read_double(name).size(), 30u) << name;
  const auto tokens = reader.read_int64("/train/tokens");
  ASSERT_EQ(tokens.size(), 30u);
  EXPECT_EQ(tokens.back(), 30 * 16 * 64);  // steps x (8 x 2 sequences) x 64 tokens
  EXPECT_TRUE(reader.has_dataset("/train/skipped"));
  const auto grad = reader.read_matrix("/train/tensor/grad_norm");
  const auto param = reader.read_matrix("/train/tensor/param_norm");
  EXPECT_EQ(grad.rows, 30);
  EXPECT_EQ(param.rows, 30);
  const auto names = reader.read_string_attribute("/train/tensor/grad_norm", "names");
  EXPECT_EQ(static_cast<int64_t>(names.size()), grad.cols);
  EXPECT_EQ(names.front(), "embed.weight");
  bool saw_start = false;
  for (const auto& e : reader.read_events()) saw_start |= e.kind == "run_start";
  EXPECT_TRUE(saw_start);
  bool saw_layers = false;
  for (const auto& [key, value] : reader.read_config()) saw_layers |= key == "model.layers" && value == "2";
  EXPECT_TRUE(saw_layers);
  EXPECT_TRUE(std::filesystem::exists(run_dir + "/config.ini"));
  EXPECT_TRUE(std::filesystem::exists(run_dir + "/train.log"));

  auto inspect = run_keel("inspect " + run_dir);
  EXPECT_EQ(inspect.exit_code, 0) << inspect.output;
  EXPECT_NE(inspect.output.find("metrics: 30 steps"), std::string::npos) << inspect.output;
}

// μP end to end: the keys reach config.ini and the checkpoint, a resume continues bit for bit (the μP factors come
// back from the checkpoint's config), and export-hf refuses the model, naming the key.
TEST(TrainRun, MupRunResumesExactlyAndIsNotExportedToHf) {
  const std::string run = fresh_dir("mup"), resumed = fresh_dir("mup-resumed"), hf = fresh_dir("mup-hf");
  const std::string mup = " --set model.parametrization=mup --set model.mup_base_d_model=16";  // m = 64 / 16
  auto r = run_keel("train " + tiny_args("--set train.steps=6 --set checkpoint.every=3" + mup) + " --run-dir " + run);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream ini(run + "/config.ini");
  const std::string text((std::istreambuf_iterator<char>(ini)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("parametrization = mup"), std::string::npos) << text;
  EXPECT_NE(text.find("mup_base_d_model = 16"), std::string::npos) << text;
  r = run_keel("resume --from " + run + "/checkpoints/step-00000003 --run-dir " + resumed);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto original = MetricsReader(run + "/metrics.h5").read_double("/train/loss");
  const auto continued = MetricsReader(resumed + "/metrics.h5").read_double("/train/loss");
  ASSERT_EQ(original.size(), 6u);
  ASSERT_EQ(continued.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(continued[i], original[3 + i]) << "step " << 3 + i;
  r = run_keel("export-hf " + run + "/checkpoints/step-00000006 " + hf);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("model.parametrization = mup"), std::string::npos) << r.output;
  for (const auto& dir : {run, resumed, hf}) std::filesystem::remove_all(dir);
}

TEST(TrainRun, MetricsReadableAfterSigkill) {
  const std::string run_dir = fresh_dir("sigkill");
  const pid_t pid = spawn_train(run_dir, "--set train.steps=100000 --set metrics.flush_every=3");
  const std::string path = run_dir + "/metrics.h5";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  while (readable_rows(path) < 9 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::this_thread::sleep_for(std::chrono::milliseconds(370));  // land somewhere between flushes
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  MetricsReader reader(path);
  const auto steps = reader.read_int64("/train/step");
  const auto loss = reader.read_double("/train/loss");
  ASSERT_GE(steps.size(), 9u);
  EXPECT_EQ(steps.size() % 3, 0u);  // whole flushes only
  EXPECT_EQ(loss.size(), steps.size());
  for (double l : loss) EXPECT_TRUE(std::isfinite(l));
}

TEST(TrainRun, SigtermFinishesTheStepAndExitsZero) {
  const std::string run_dir = fresh_dir("sigterm");
  const pid_t pid = spawn_train(run_dir, "--set train.steps=100000 --set metrics.flush_every=1");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  while (readable_rows(run_dir + "/metrics.h5") < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  MetricsReader reader(run_dir + "/metrics.h5");
  bool saw_stop = false;
  for (const auto& e : reader.read_events()) saw_stop |= e.kind == "stop";
  EXPECT_TRUE(saw_stop);
  EXPECT_EQ(reader.read_int64("/train/step").size(), reader.read_double("/train/loss").size());
}

TEST(TrainRun, ExistingRunDirIsNotOverwrittenWithoutForce) {
  const std::string run_dir = fresh_dir("noforce");
  ASSERT_EQ(run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir +
                     " --set train.steps=2")
                .exit_code,
            0);
  const auto before = std::filesystem::last_write_time(run_dir + "/metrics.h5");
  const auto size_before = std::filesystem::file_size(run_dir + "/metrics.h5");
  auto again = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir +
                        " --set train.steps=3");
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.output.find("--force"), std::string::npos) << again.output;
  EXPECT_EQ(std::filesystem::last_write_time(run_dir + "/metrics.h5"), before);
  EXPECT_EQ(std::filesystem::file_size(run_dir + "/metrics.h5"), size_before);
  auto forced = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir +
                         " --set train.steps=3 --force");
  EXPECT_EQ(forced.exit_code, 0) << forced.output;
  EXPECT_EQ(MetricsReader(run_dir + "/metrics.h5").read_int64("/train/step").size(), 3u);
}

TEST(Cli, ConfigErrorsExitNonZeroNamingKeyOrFile) {
  const std::string run_dir = fresh_dir("cli-errors");
  auto unknown = run_keel("train --config " + tiny_config() + " --run-dir " + run_dir + " --set model.layerz=3");
  EXPECT_NE(unknown.exit_code, 0);
  EXPECT_NE(unknown.output.find("model.layerz"), std::string::npos) << unknown.output;
  EXPECT_FALSE(std::filesystem::exists(run_dir)) << "a refused config must not create the run dir";
  auto missing = run_keel("train --config /nonexistent/x.ini --run-dir " + run_dir);
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("/nonexistent/x.ini"), std::string::npos) << missing.output;
  auto bad_option = run_keel("train --config " + tiny_config() + " --run-dir " + run_dir + " --colour red");
  EXPECT_NE(bad_option.exit_code, 0);
  EXPECT_NE(bad_option.output.find("colour"), std::string::npos) << bad_option.output;
  if (!torch::cuda::is_available()) {
    auto no_gpu = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir +
                           " --set train.device=cuda");
    EXPECT_NE(no_gpu.exit_code, 0);
    EXPECT_NE(no_gpu.output.find("train.device"), std::string::npos) << no_gpu.output;
    EXPECT_FALSE(std::filesystem::exists(run_dir));
  }
  auto bad_command = run_keel("frobnicate");
  EXPECT_NE(bad_command.exit_code, 0);
  auto version = run_keel("--version");
  EXPECT_EQ(version.exit_code, 0);
  EXPECT_NE(version.output.find("keel "), std::string::npos);
}

TEST(Cli, UnpreparedDataSaysWhichCommandToRun) {
  const std::string run_dir = fresh_dir("unprepared");
  auto result =
      run_keel("train --config " + tiny_config() + " --set data.dir=/tmp/keel-no-such-data --run-dir " + run_dir);
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.output.find("keel data prepare"), std::string::npos) << result.output;
}

TEST(Cli, ShowBatchIsDeterministicAcrossProcesses) {
  const std::string args = "data show-batch --config " + tiny_config() + " " + test_data_override() + " --step 5";
  auto first = run_keel(args);
  auto second = run_keel(args);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_EQ(first.output, second.output);
  EXPECT_NE(first.output.find("prose"), std::string::npos) << first.output;
  auto other = run_keel("data show-batch --config " + tiny_config() + " " + test_data_override() + " --step 6");
  EXPECT_NE(first.output, other.output);
}

TEST(Cli, PrepareIsIdempotent) {
  auto result = run_keel("data prepare --config " + tiny_config() + " " + test_data_override());
  EXPECT_EQ(result.exit_code, 0) << result.output;
}

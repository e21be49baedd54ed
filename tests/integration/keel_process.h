// Why: integration tests drive the real `keel` binary as a user would; this runs it and captures what it says.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <thread>

#include "core/checkpoint/checkpoint_store.h"
#include "core/metrics/metrics_reader.h"

namespace keel::testing {

struct ProcessResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

inline ProcessResult run_shell(const std::string& command);
inline ProcessResult run_keel_with_env(const std::string& env, const std::string& arguments);
inline ProcessResult run_keel(const std::string& arguments) { return run_keel_with_env("", arguments); }

// Runs a shell command line; its stdout (append 2>&1 for stderr too) and exit status (128 + signal if killed).
inline ProcessResult run_shell(const std::string& command) {
  ProcessResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

// The same with extra environment variables ("A=1 B=2"; may be empty) for the command.
inline ProcessResult run_keel_with_env(const std::string& env, const std::string& arguments) {
  return run_shell((env.empty() ? "" : "env " + env + " ") + std::string(KEEL_BINARY) + " " + arguments + " 2>&1");
}

// `keel ARGUMENTS`, killed after `seconds` (exit 124 then, timeout(1)'s status).
inline ProcessResult run_keel_within(int seconds, const std::string& arguments) {
  return run_shell("timeout -k 5 " + std::to_string(seconds) + " " + std::string(KEEL_BINARY) + " " + arguments +
                   " 2>&1");
}

inline std::string tiny_config() { return std::string(KEEL_SOURCE_DIR) + "/experiments/tiny.ini"; }
inline std::string test_data_override() { return std::string("--set data.dir=") + KEEL_TEST_DATA_DIR; }
// `--config` tiny.ini on the test data with a cosine horizon of 30 steps, then `extra` (for `keel train`).
inline std::string tiny_args(const std::string& extra = "") {
  return "--config " + tiny_config() + " " + test_data_override() + " --set optim.decay_steps=30 " + extra;
}
#ifdef KEEL_TEST_PLUGIN_DIR
// A plugin of tests/plugin_fixtures (lr_spike, poison_grads, ...) by name: its path in the build tree.
inline std::string fixture_plugin(const std::string& name) {
  return std::string(KEEL_TEST_PLUGIN_DIR) + "/keel_plugin_" + name + ".so";
}
#endif

// A fresh, empty directory under the system temp dir, unique per test.
inline std::string fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("keel-it-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

// Starts `keel ARGUMENTS` in the background (output discarded); returns its pid for kill()/waitpid().
inline pid_t spawn_keel(const std::string& arguments) {
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string command = std::string("exec ") + KEEL_BINARY + " " + arguments + " >/dev/null 2>&1";
    execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
    _exit(127);
  }
  return pid;
}

// Starts `keel train` on the tiny config and the test data in the background; returns its pid.
inline pid_t spawn_train(const std::string& run_dir, const std::string& extra) {
  return spawn_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + run_dir + " " +
                    extra);
}

// Starts `keel train` on the tiny config with `extra`, waits (up to 120 s) for its first committed checkpoint, lets it
// run 300 ms plus a random 0-900 ms more and SIGKILLs it: with a save every step, the kill nearly always lands
// inside one. Fails the test unless the process died by that signal.
inline void kill_train_after_first_checkpoint(const std::string& run_dir, const std::string& extra, std::mt19937& rng) {
  std::uniform_int_distribution<int> delay_ms(0, 900);
  const pid_t pid = spawn_train(run_dir, extra);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!std::filesystem::exists(run_dir + "/checkpoints/latest") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(300 + delay_ms(rng)));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
}

// After the save of checkpoint `failed_step` failed: `latest` still names step `kept_step`, the failed step left
// neither a checkpoint nor its .tmp dir, and the kept step is the only valid checkpoint.
inline void expect_only_checkpoint(const std::string& run_dir, int64_t kept_step, int64_t failed_step) {
  const auto step_dir = [](int64_t step) {
    char name[32];
    std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
    return std::string(name);
  };
  const keel::checkpoint::CheckpointStore store(run_dir + "/checkpoints");
  ASSERT_TRUE(store.latest_pointer().has_value());
  EXPECT_EQ(std::filesystem::path(*store.latest_pointer()).filename(), step_dir(kept_step));
  EXPECT_FALSE(std::filesystem::exists(run_dir + "/checkpoints/" + step_dir(failed_step)));
  EXPECT_FALSE(std::filesystem::exists(run_dir + "/checkpoints/" + step_dir(failed_step) + ".tmp"));
  for (const auto& e : store.list_valid()) EXPECT_EQ(e.step, kept_step);
}

// Rows readable from a metrics file that may be mid-write: 0 on any read error.
inline size_t readable_rows(const std::string& path) {
  try {
    return keel::metrics::MetricsReader(path).read_int64("/train/step").size();
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace keel::testing

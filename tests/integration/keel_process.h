// Why: integration tests drive the real `keel` binary as a user would; this runs it and captures what it says.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

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

// Rows readable from a metrics file that may be mid-write: 0 on any read error.
inline size_t readable_rows(const std::string& path) {
  try {
    return keel::metrics::MetricsReader(path).read_int64("/train/step").size();
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace keel::testing

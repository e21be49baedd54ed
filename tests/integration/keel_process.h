// Why: integration tests drive the real `keel` binary as a user would; this runs it and captures what it says.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

namespace keel::testing {

struct ProcessResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

inline ProcessResult run_keel(const std::string& arguments) {
  const std::string command = std::string(KEEL_BINARY) + " " + arguments + " 2>&1";
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

inline std::string tiny_config() { return std::string(KEEL_SOURCE_DIR) + "/experiments/tiny.ini"; }
inline std::string test_data_override() { return std::string("--set data.dir=") + KEEL_TEST_DATA_DIR; }

// A fresh, empty directory under the system temp dir, unique per test.
inline std::string fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("keel-it-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

}  // namespace keel::testing

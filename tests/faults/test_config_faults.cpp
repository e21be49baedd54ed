// Why: a config that says something twice, describes a model no machine here can hold, or names its data by a
// path relative to somewhere else must be refused, or read as the user meant, before `keel train` creates the
// run dir. Driven through the binary: the one-line error, the exit status, and the run dir that must not exist.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

#include "faults/fault_support.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;

// experiments/tiny.ini with `extra` appended, written to DIR/NAME; returns the path.
std::string tiny_with(const std::string& dir, const std::string& name, const std::string& extra) {
  fs::create_directories(dir);
  const std::string path = dir + "/" + name;
  std::ofstream(path) << read_text_file(tiny_config()) << extra;
  return path;
}

// experiments/tiny.ini with its data.dir line replaced by `dir = DATA_DIR`.
std::string tiny_with_data_dir(const std::string& dir, const std::string& data_dir) {
  std::string text = read_text_file(tiny_config());
  const size_t begin = text.find("\ndir = ");
  const size_t end = text.find('\n', begin + 1);
  EXPECT_NE(begin, std::string::npos);
  text.replace(begin + 1, end - begin - 1, "dir = " + data_dir);
  fs::create_directories(dir);
  const std::string path = dir + "/tiny.ini";
  std::ofstream(path) << text;
  return path;
}

// The 1-based line on which a line equal to `what` first (or last) appears in the file.
int line_of(const std::string& path, const std::string& what, bool last = false) {
  const std::string text = "\n" + read_text_file(path);
  const size_t at = last ? text.rfind("\n" + what + "\n") : text.find("\n" + what + "\n");
  return at == std::string::npos ? -1 : static_cast<int>(std::count(text.begin(), text.begin() + at + 1, '\n'));
}

// Runs the process in `dir` for its lifetime (keel resolves --set paths against the current directory).
class InDirectory {
 public:
  explicit InDirectory(const std::string& dir) : previous_(fs::current_path()) { fs::current_path(dir); }
  ~InDirectory() { fs::current_path(previous_); }

 private:
  fs::path previous_;
};

TEST(ConfigFaults, RepeatedKeyIsRefusedBeforeTheRunDirExists) {
  const std::string dir = fresh_dir("config-dup-key");
  const std::string config = tiny_with(dir, "x.ini", "\n[train]\nsteps = 5\n");  // tiny.ini sets train.steps too
  const std::string run_dir = dir + "/run";
  const ProcessResult r = run_keel("train --config " + config + " " + test_data_override() + " --run-dir " + run_dir);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(last_line(r.output),
            "keel train: error: " + config + ":" + std::to_string(line_of(config, "[train]", true)) +
                ": section [train] already appears on line " + std::to_string(line_of(config, "[train]")))
      << r.output;
  EXPECT_FALSE(fs::exists(run_dir));

  const std::string again = tiny_with(dir, "y.ini", "");
  std::string text = read_text_file(again);
  text.insert(text.find("[optim]\n") + 8, "lr = 0.5\n");  // optim.lr is set further down as well
  std::ofstream(again) << text;
  const ProcessResult k = run_keel("train --config " + again + " " + test_data_override() + " --run-dir " + run_dir);
  EXPECT_EQ(k.exit_code, 1) << k.output;
  const int first = line_of(again, "lr = 0.5");
  const int second = line_of(again, "lr = 3e-3");
  EXPECT_EQ(last_line(k.output), "keel train: error: " + again + ":" + std::to_string(second) +
                                     ": key optim.lr is already set on line " + std::to_string(first))
      << k.output;
  EXPECT_FALSE(fs::exists(run_dir));
  fs::remove_all(dir);
}

TEST(ConfigFaults, RepeatedSourceSectionIsRefusedDifferentSourcesAreNot) {
  const std::string dir = fresh_dir("config-dup-source");
  const std::string config = tiny_with(dir, "x.ini", "\n[source.prose]\nmax_mb = 1\n");
  const std::string run_dir = dir + "/run";
  const ProcessResult r = run_keel("train --config " + config + " " + test_data_override() + " --run-dir " + run_dir);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(last_line(r.output).find(": section [source.prose] already appears on line " +
                                     std::to_string(line_of(config, "[source.prose]"))),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(run_dir));
  // tiny.ini's own [source.prose] and [source.code] are two sources; two --set of one key: the last one wins.
  const ProcessResult ok = run_keel("config show --config " + tiny_config() + " --set optim.lr=0.1 --set optim.lr=0.2");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("lr = 0.2\n"), std::string::npos) << ok.output;
  fs::remove_all(dir);
}

TEST(ConfigFaults, AbsurdModelIsRefusedFastWithTheEstimate) {
  const std::string dir = fresh_dir("config-absurd");
  for (const std::string& size : {"model.layers=100000", "model.d_model=1000000000"}) {
    const std::string run_dir = dir + "/run";
    const auto start = std::chrono::steady_clock::now();
    const ProcessResult r = run_keel("train --config " + tiny_config() + " " + test_data_override() + " --run-dir " +
                                     run_dir + " --set " + size);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(r.exit_code, 1) << r.output;
    const std::string line = last_line(r.output);
    EXPECT_EQ(line.rfind("keel train: error: " + tiny_config() + ": model.layers=", 0), 0u) << r.output;
    EXPECT_NE(line.find(size), std::string::npos) << r.output;
    EXPECT_NE(line.find("parameters, an estimated "), std::string::npos) << r.output;
    EXPECT_NE(line.find(" GiB of RAM (MemTotal in /proc/meminfo): reduce the model.* sizes"), std::string::npos)
        << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
    EXPECT_LT(seconds, 20.0) << r.output;
    EXPECT_FALSE(fs::exists(run_dir)) << size;
  }
  fs::remove_all(dir);
}

// `dir = data` in a config elsewhere means the data next to that config, from whatever directory keel runs in;
// the run's config.ini records the absolute path. `--set data.dir=REL` means REL in the current directory.
TEST(ConfigFaults, RelativeDataDirResolvesNextToTheConfigFile) {
  const std::string dir = fresh_dir("config-reldata");
  const std::string config = tiny_with_data_dir(dir + "/exp", "data");
  fs::create_directory_symlink(KEEL_TEST_DATA_DIR, dir + "/exp/data");
  fs::create_directories(dir + "/elsewhere");
  {
    InDirectory cwd(dir + "/elsewhere");  // no "data" here
    const ProcessResult r =
        run_keel("train --config ../exp/tiny.ini --run-dir run --set train.steps=2 --set checkpoint.at_end=false");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(read_text_file(dir + "/elsewhere/run/config.ini").find("\ndir = " + dir + "/exp/data\n"),
              std::string::npos)
        << read_text_file(dir + "/elsewhere/run/config.ini");
  }
  // The same config, its data missing: the refusal names the absolute path it looked in.
  const std::string missing = tiny_with_data_dir(dir + "/other", "nothing/here");
  {
    InDirectory cwd(dir + "/elsewhere");
    const ProcessResult r = run_keel("train --config ../other/tiny.ini --run-dir run2");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(last_line(r.output).find(dir + "/other/nothing/here"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir + "/elsewhere/run2"));
    // --set is relative to where it is typed.
    fs::create_directory_symlink(KEEL_TEST_DATA_DIR, dir + "/elsewhere/mine");
    const ProcessResult s = run_keel("config show --config " + missing + " --set data.dir=mine");
    EXPECT_EQ(s.exit_code, 0) << s.output;
    EXPECT_NE(s.output.find("\ndir = " + dir + "/elsewhere/mine\n"), std::string::npos) << s.output;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace keel::testing

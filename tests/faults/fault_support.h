// Why: what the fault tests share beyond running the binary (tests/integration/keel_process.h): a small tmpfs
// mounted for one test (a full disk under a run dir, without filling the machine's own disk), and reading a
// run's train.log. Mounting needs root; without it a test skips and says why.
#pragma once

#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "integration/keel_process.h"

namespace keel::testing {

// A tmpfs of `bytes` mounted at a fresh directory for the lifetime of the object. `mounted()` is false (and
// `why_not()` says why) when this process may not mount, e.g. not root; tests then GTEST_SKIP.
class SmallDisk {
 public:
  SmallDisk(const std::string& name, int64_t bytes) : dir_(fresh_dir(name)) {
    std::filesystem::create_directories(dir_);
    if (::geteuid() != 0) {
      why_not_ = "needs root to mount a tmpfs";
      return;
    }
    const std::string options = "size=" + std::to_string(bytes);
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      why_not_ = std::string("cannot mount a tmpfs: ") + std::strerror(errno);
      return;
    }
    mounted_ = true;
  }
  ~SmallDisk() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  SmallDisk(const SmallDisk&) = delete;
  SmallDisk& operator=(const SmallDisk&) = delete;

  bool mounted() const { return mounted_; }
  const std::string& why_not() const { return why_not_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::string why_not_;
  bool mounted_ = false;
};

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The last non-empty line of `text` (a command's one-line error).
inline std::string last_line(const std::string& text) {
  size_t end = text.find_last_not_of('\n');
  if (end == std::string::npos) return "";
  const size_t begin = text.rfind('\n', end);
  return text.substr(begin == std::string::npos ? 0 : begin + 1,
                     end - (begin == std::string::npos ? 0 : begin + 1) + 1);
}

}  // namespace keel::testing

// Why: see run_dir.h.
#include "core/train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

namespace keel::train {
namespace {

namespace fs = std::filesystem;

const char* const kMarkerText = "This directory was created by keel for one training run (keel train/resume).\n";

std::string read_pid_text(const std::string& lock_path) {
  std::ifstream in(lock_path);
  std::string pid;
  in >> pid;
  return pid.empty() ? "?" : pid;
}

// Files a run writes, which `--force` removes (and remove_unstarted_run()).
std::vector<std::string> run_files(const RunPaths& p) {
  return {p.config_ini(), p.metrics_h5(), p.log_file(), p.lineage_json(), p.checkpoints(), p.control_dir()};
}

}  // namespace

std::unique_ptr<RunDirLock> RunDirLock::acquire(const std::string& dir) {
  const std::string path = RunPaths{dir}.lock_file();
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw RunDirError("run dir " + dir + ": cannot open " + path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    ::close(fd);
    if (error == EWOULDBLOCK) {
      throw RunDirError("run dir " + dir + " is in use by pid " + read_pid_text(path) + " (a live keel run holds " +
                        path + "); wait for it to end or choose another directory");
    }
    throw RunDirError("run dir " + dir + ": cannot lock " + path + ": " + std::strerror(error));
  }
  // Under the lock: record the owner for the messages of those refused.
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int error = errno;
    ::close(fd);
    throw RunDirError("run dir " + dir + ": cannot write " + path + ": " + std::strerror(error));
  }
  return std::unique_ptr<RunDirLock>(new RunDirLock(path, fd));
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

long run_dir_owner(const std::string& dir) {
  const std::string path = RunPaths{dir}.lock_file();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  long owner = 0;
  // A shared lock is refused while a run holds the exclusive one; released at once when granted.
  if (::flock(fd, LOCK_SH | LOCK_NB) != 0) {
    owner = -1;
    try {
      owner = std::stol(read_pid_text(path));
    } catch (const std::exception&) {
    }
  } else {
    ::flock(fd, LOCK_UN);
  }
  ::close(fd);
  return owner;
}

RunDirClaim create_run_dir(const std::string& dir, bool force) {
  RunDirClaim claim;
  claim.paths = RunPaths{dir};
  const RunPaths& paths = claim.paths;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw RunDirError("run dir " + dir + " exists and is not a directory");
  claim.created_dir = !fs::exists(dir, ec);
  fs::create_directories(dir, ec);
  if (ec) throw RunDirError("run dir " + dir + ": cannot create it: " + ec.message());
  claim.lock = RunDirLock::acquire(dir);

  // Under the lock: what is there besides the lock itself?
  std::set<std::string> present;
  for (const auto& item : fs::directory_iterator(dir, ec)) present.insert(item.path().filename().string());
  present.erase(".lock");
  if (present.size() == 1 && present.count(".keel-run")) present.clear();  // left by a run that never started
  if (!present.empty()) {
    if (!force) {
      throw RunDirError("run dir " + dir +
                        " already holds a run; choose a new --run-dir or pass --force to replace it");
    }
    if (!fs::is_regular_file(paths.marker_file(), ec)) {
      throw RunDirError("run dir " + dir + " was not created by keel (no " + paths.marker_file() +
                        "); --force replaces only keel's own run dirs: remove its contents yourself or choose another "
                        "--run-dir");
    }
    for (const auto& path : run_files(paths)) {
      fs::remove_all(path, ec);
      if (ec) throw RunDirError("run dir " + dir + ": --force cannot remove " + path + ": " + ec.message());
    }
  }
  std::ofstream marker(paths.marker_file(), std::ios::trunc);
  marker << kMarkerText;
  marker.close();
  if (!marker) throw RunDirError("run dir " + dir + ": cannot write " + paths.marker_file());
  return claim;
}

void remove_unstarted_run(const RunDirClaim& claim) {
  std::error_code ec;
  for (const auto& path : run_files(claim.paths)) fs::remove_all(path, ec);
  // The marker goes only when nothing else is left (the lock file is ours).
  std::set<std::string> rest;
  for (const auto& item : fs::directory_iterator(claim.paths.root, ec)) rest.insert(item.path().filename().string());
  rest.erase(".lock");
  rest.erase(".keel-run");
  if (!rest.empty()) return;
  fs::remove(claim.paths.marker_file(), ec);
  fs::remove(claim.paths.lock_file(), ec);  // still held: a waiting claimant finds the directory empty or gone
  if (claim.created_dir) fs::remove(claim.paths.root, ec);
}

}  // namespace keel::train

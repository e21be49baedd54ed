// Why: a run directory is a record of an experiment; Keel never overwrites one by accident and never lets two
// processes write one at once. This is the one place that decides whether a directory may be (re)used:
//   - a live run holds an OS advisory lock (flock) on RUN_DIR/.lock for its whole life, taken before anything
//     is written; a second trainer, `--force`, `keel resume` into it or `keel eval` writing into it is refused
//     naming the pid that holds it. A lock left by a dead process is released by the kernel: no refusal.
//   - RUN_DIR/.keel-run marks a directory that Keel created; `--force` replaces only such a directory (and
//     only the files a run writes), so a user's own directory is never emptied.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

namespace keel::train {

struct RunPaths {
  std::string root;
  std::string config_ini() const { return root + "/config.ini"; }
  std::string metrics_h5() const { return root + "/metrics.h5"; }
  std::string log_file() const { return root + "/train.log"; }
  std::string checkpoints() const { return root + "/checkpoints"; }
  std::string lineage_json() const { return root + "/lineage.json"; }
  std::string control_dir() const { return root + "/control"; }
  std::string lock_file() const { return root + "/.lock"; }
  std::string marker_file() const { return root + "/.keel-run"; }
};

// Thrown when a directory cannot be claimed (in use, holds something else, not a directory).
class RunDirError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An exclusive flock on DIR/.lock, released when the object goes (or the process dies). The lock file holds the
// owner's pid, for the messages of those refused.
class RunDirLock {
 public:
  // Takes the lock without waiting; throws RunDirError("run dir DIR is in use by pid P (WHAT)") when a live
  // process holds it. `dir` must exist.
  static std::unique_ptr<RunDirLock> acquire(const std::string& dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  RunDirLock(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_ = -1;
};

// The pid holding DIR/.lock, or 0 when no live process holds it (never locks anything).
long run_dir_owner(const std::string& dir);

// A run dir claimed for a new run: its paths, its lock (hold it for the whole run) and whether this claim made
// the directory (so that a run that never started can leave nothing behind: remove_unstarted_run()).
struct RunDirClaim {
  RunPaths paths;
  std::unique_ptr<RunDirLock> lock;
  bool created_dir = false;
};

// Claims `dir` for a new run: creates it if needed, takes its lock, and then (under the lock, so two processes
// racing for one empty directory cannot both pass) checks it. An existing non-empty directory is refused
// (RunDirError naming it) unless `force`; with `force` it must carry Keel's marker, and only the files a run
// writes (config.ini, metrics.h5, train.log, lineage.json, checkpoints/, control/) are removed first. The marker
// is written before returning.
RunDirClaim create_run_dir(const std::string& dir, bool force);

// Removes what a run that failed before its first step wrote into `claim`'s directory (run files, marker), and
// the directory itself when the claim created it and it is then empty. Never throws.
void remove_unstarted_run(const RunDirClaim& claim);

}  // namespace keel::train

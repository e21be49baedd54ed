// Why: the directory protocol that makes checkpoints atomic and retention safe (docs/checkpoints.md):
//   save:   files go into ROOT/step-N.tmp/; manifest.json (sizes + SHA-256) is written last; files and the
//           directory are fsynced; step-N.tmp is renamed to step-N; then ROOT/latest is atomically replaced.
//   valid:  a step-N directory holding step N, with a manifest that lists every file in it (config.ini and
//           every rank file included), whose files all match their sizes and checksums. Anything else (a .tmp,
//           a directory without manifest, a damaged or unlisted file) is never loaded and never counted.
//   prune:  keep the newest K valid checkpoints plus every M-th step, plus the newest one whose tensors were
//           checked finite; a pruned directory is first renamed to step-N.deleting (atomic) and then removed,
//           so a kill while pruning never leaves a half-deleted directory that looks like a checkpoint.
//   resume: from a run dir, the newest valid checkpoint, whatever `latest` says (a kill between the rename of
//           step-N and the move of `latest` leaves `latest` one behind); a warning says so when they differ.
// Torch-free: it moves files, the trainer decides what goes in them.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/checkpoint/manifest.h"

namespace keel::checkpoint {

// "step-00000100"
std::string step_dir_name(int64_t step);
// Parses "step-00000100" (exactly 8+ digits, nothing else) into 100.
std::optional<int64_t> parse_step_dir_name(const std::string& name);

// True if `path` is meant as one checkpoint (it has a manifest.json or is named step-XXXXXXXX), as opposed to
// a run directory. Says nothing about validity.
bool names_checkpoint_dir(const std::string& path);

struct CheckpointEntry {
  int64_t step = 0;
  std::string dir;
  bool tensors_finite = false;  // filled in by list_valid(): the manifest says its tensors were checked finite
};

// A file's size and SHA-256, computed by whoever wrote and fsynced it (an asynchronous save's rank threads).
struct FileDigest {
  int64_t bytes = 0;
  std::string sha256;
};

class CheckpointStore {
 public:
  explicit CheckpointStore(std::string root);  // RUN_DIR/checkpoints (created on first save)
  const std::string& root() const { return root_; }

  // A fresh, empty ROOT/step-N.tmp/ (a stale one from a killed save is removed first). Throws if step-N exists.
  std::string begin(int64_t step);
  // Completes a save begun with begin(step): hashes `files` (name, rank) in the tmp dir, writes the manifest
  // (`manifest.files` and `manifest.tensors_finite` are filled in here: true when every rank file says
  // write_rank_file checked its tensors), fsyncs, renames to step-N and points ROOT/latest at it (removing
  // stale latest.tmp-* files of killed saves). Throws CheckpointError if the tmp dir holds a file that is not
  // in `files`. Returns the final directory. A file named in `known` was fsynced and hashed by its writer: its
  // digest is taken as given (the asynchronous save hashes each rank file on that rank's background thread).
  std::string commit(int64_t step, Manifest manifest, const std::vector<std::pair<std::string, int64_t>>& files,
                     const std::map<std::string, FileDigest>& known = {});
  bool exists(int64_t step) const;

  // Every step-N directory, oldest first, without checking it.
  std::vector<CheckpointEntry> list() const;
  // The valid ones, oldest first. Checksums are verified once per directory and process (then remembered).
  std::vector<CheckpointEntry> list_valid() const;
  // Applies retention; returns the directories removed. keep_last == 0 keeps all. The newest valid checkpoint
  // whose tensors were checked finite is never removed, even when it is older than the newest keep_last.
  std::vector<std::string> prune(int64_t keep_last, int64_t milestone_every);
  // The directory ROOT/latest names, if the pointer exists.
  std::optional<std::string> latest_pointer() const;

 private:
  bool is_valid(const CheckpointEntry& entry) const;
  std::string root_;
  mutable std::map<std::string, bool> verified_;  // valid directory -> its manifest's tensors_finite
};

// What `keel resume --from PATH` loads. PATH is a checkpoint directory (must be valid, and a step-N directory
// must hold step N: no fallback) or a run directory (its newest valid checkpoint; never step 0). Throws
// CheckpointError naming every damaged candidate when nothing valid is found.
struct ResolvedCheckpoint {
  std::string dir;
  Manifest manifest;
  // One line per damaged checkpoint passed over, and one when the checkpoint loaded is not the one `latest`
  // names (missing, dangling, malformed or behind).
  std::vector<std::string> warnings;
};
ResolvedCheckpoint resolve_checkpoint(const std::string& path);

}  // namespace keel::checkpoint

// Why: see checkpoint_store.h.
#include "core/checkpoint/checkpoint_store.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/sha256.h"

namespace keel::checkpoint {
namespace fs = std::filesystem;

namespace {

constexpr const char* kLatestName = "latest";
constexpr const char* kLatestTmpPrefix = "latest.tmp-";  // write_file_atomically's temp files for `latest`
constexpr const char* kTmpSuffix = ".tmp";
constexpr const char* kDeletingSuffix = ".deleting";

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw CheckpointError("cannot remove " + path + ": " + ec.message());
}

// True when write_rank_file marked `path` (root attribute tensors_finite = 1: it checked every model and
// optimizer tensor finite before writing). Files it did not write (or an older Keel) count as unchecked.
bool rank_file_checked_finite(const std::string& path) {
  try {
    const H5Reader in(path);
    return in.int_attribute("/", "tensors_finite") == 1;
  } catch (const CheckpointError&) {
    return false;
  }
}

// Removes latest.tmp-PID files that a save killed while replacing `latest` left behind.
void remove_stale_latest_tmp(const std::string& root) {
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(kLatestTmpPrefix, 0) == 0 && !it->is_directory()) {
      std::error_code remove_error;
      fs::remove(it->path(), remove_error);
      if (remove_error) throw CheckpointError("cannot remove " + it->path().string() + ": " + remove_error.message());
    }
  }
}

}  // namespace

std::string step_dir_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

bool names_checkpoint_dir(const std::string& path) {
  return fs::exists(path + "/" + kManifestName) ||
         parse_step_dir_name(fs::path(path).lexically_normal().filename().string()).has_value();
}

CheckpointStore::CheckpointStore(std::string root) : root_(std::move(root)) {}

std::string CheckpointStore::begin(int64_t step) {
  if (exists(step)) throw CheckpointError(root_ + "/" + step_dir_name(step) + " already exists");
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec) throw CheckpointError("cannot create " + root_ + ": " + ec.message());
  const std::string tmp = root_ + "/" + step_dir_name(step) + kTmpSuffix;
  if (fs::exists(tmp)) remove_tree(tmp);  // left by a save that was killed
  fs::create_directory(tmp, ec);
  if (ec) throw CheckpointError("cannot create " + tmp + ": " + ec.message());
  return tmp;
}

std::string CheckpointStore::commit(int64_t step, Manifest manifest,
                                    const std::vector<std::pair<std::string, int64_t>>& files,
                                    const std::map<std::string, FileDigest>& known) {
  const std::string name = step_dir_name(step);
  const std::string tmp = root_ + "/" + name + kTmpSuffix;
  const std::string final_dir = root_ + "/" + name;
  manifest.step = step;
  manifest.files.clear();
  // A committed checkpoint lists every file it holds (an unlisted one makes it invalid): refuse to commit one.
  {
    std::set<std::string> listed;
    for (const auto& f : files) listed.insert(f.first);
    std::error_code ec;
    for (fs::directory_iterator it(tmp, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (!listed.count(name)) {
        throw CheckpointError("cannot commit checkpoint step " + std::to_string(step) + ": " + it->path().string() +
                              " is not one of the files being committed");
      }
    }
    if (ec) throw CheckpointError("cannot list " + tmp + ": " + ec.message());
  }
  bool finite = false;
  for (const auto& [file, rank] : files) {
    if (rank < 0) continue;
    finite = rank_file_checked_finite(tmp + "/" + file);
    if (!finite) break;
  }
  manifest.tensors_finite = finite;
  for (const auto& [file, rank] : files) {
    const std::string path = tmp + "/" + file;
    ManifestFile entry;
    entry.name = file;
    entry.rank = rank;
    const auto digest = known.find(file);
    if (digest != known.end()) {
      if (static_cast<int64_t>(fs::file_size(path)) != digest->second.bytes) {
        throw CheckpointError("cannot commit checkpoint step " + std::to_string(step) + ": " + path + " has " +
                              std::to_string(fs::file_size(path)) + " bytes, its writer hashed " +
                              std::to_string(digest->second.bytes));
      }
      entry.bytes = digest->second.bytes;
      entry.sha256 = digest->second.sha256;
    } else {
      fsync_path(path);
      entry.bytes = static_cast<int64_t>(fs::file_size(path));
      entry.sha256 = sha256_file(path);
    }
    manifest.files.push_back(std::move(entry));
  }
  // The manifest is the commit record: written (and fsynced) after every file it lists.
  write_file_atomically(tmp + "/" + kManifestName, manifest_to_json(manifest));
  fsync_path(tmp);
  rename_durably(tmp, final_dir);
  verified_[final_dir] = finite;
  remove_stale_latest_tmp(root_);
  write_file_atomically(root_ + "/" + kLatestName, name + "\n");
  return final_dir;
}

bool CheckpointStore::exists(int64_t step) const { return fs::exists(root_ + "/" + step_dir_name(step)); }

std::vector<CheckpointEntry> CheckpointStore::list() const {
  std::vector<CheckpointEntry> out;
  std::error_code ec;
  if (!fs::is_directory(root_, ec)) return out;
  for (const auto& item : fs::directory_iterator(root_, ec)) {
    if (!item.is_directory()) continue;
    const auto step = parse_step_dir_name(item.path().filename().string());
    if (step) out.push_back({*step, item.path().string()});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return out;
}

bool CheckpointStore::is_valid(const CheckpointEntry& entry) const {
  if (verified_.count(entry.dir)) return true;
  try {
    const Manifest m = verify_checkpoint_dir(entry.dir);
    if (m.step != entry.step) return false;
    verified_[entry.dir] = m.tensors_finite.value_or(false);
  } catch (const CheckpointError&) {
    return false;
  }
  return true;
}

std::vector<CheckpointEntry> CheckpointStore::list_valid() const {
  std::vector<CheckpointEntry> out;
  for (auto e : list()) {
    if (!is_valid(e)) continue;
    e.tensors_finite = verified_.at(e.dir);
    out.push_back(e);
  }
  return out;
}

std::vector<std::string> CheckpointStore::prune(int64_t keep_last, int64_t milestone_every) {
  std::vector<std::string> removed;
  // Finish removals a kill interrupted.
  std::error_code ec;
  if (fs::is_directory(root_, ec)) {
    for (const auto& item : fs::directory_iterator(root_, ec)) {
      const std::string name = item.path().filename().string();
      if (name.size() > 9 && name.compare(name.size() - 9, 9, kDeletingSuffix) == 0) remove_tree(item.path().string());
    }
  }
  if (keep_last <= 0) return removed;
  const std::vector<CheckpointEntry> valid = list_valid();
  const int64_t count = static_cast<int64_t>(valid.size());
  // The newest checkpoint known to hold finite tensors survives retention: if everything newer is poisoned,
  // it is the one to go back to.
  int64_t newest_finite = -1;
  for (int64_t i = 0; i < count; ++i) {
    if (valid[static_cast<size_t>(i)].tensors_finite) newest_finite = i;
  }
  for (int64_t i = 0; i < count - keep_last; ++i) {
    const CheckpointEntry& e = valid[static_cast<size_t>(i)];
    if (milestone_every > 0 && e.step % milestone_every == 0) continue;
    if (i == newest_finite) continue;
    const std::string doomed = e.dir + kDeletingSuffix;
    rename_durably(e.dir, doomed);
    verified_.erase(e.dir);
    remove_tree(doomed);
    removed.push_back(e.dir);
  }
  return removed;
}

std::optional<std::string> CheckpointStore::latest_pointer() const {
  const std::string path = root_ + "/" + kLatestName;
  if (!fs::exists(path)) return std::nullopt;
  std::string name = read_small_file(path, 256);
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
  if (!parse_step_dir_name(name)) throw CheckpointError(path + ": does not name a step-XXXXXXXX directory");
  return root_ + "/" + name;
}

ResolvedCheckpoint resolve_checkpoint(const std::string& path) {
  ResolvedCheckpoint out;
  if (!fs::is_directory(path)) throw CheckpointError(path + ": no such checkpoint or run directory");
  if (names_checkpoint_dir(path)) {
    // An explicit checkpoint: load exactly this one or fail (verify_checkpoint_dir also refuses a step-N
    // directory that holds another step).
    out.dir = path;
    out.manifest = verify_checkpoint_dir(path);
    return out;
  }
  const std::string root = path + "/checkpoints";
  CheckpointStore store(root);
  std::vector<CheckpointEntry> candidates = store.list();
  if (candidates.empty()) throw CheckpointError(path + ": no checkpoints in " + root);
  std::reverse(candidates.begin(), candidates.end());  // newest first
  // The newest valid checkpoint, whatever `latest` says: a save killed between its rename and the move of
  // `latest` leaves `latest` naming the previous one.
  std::optional<std::string> latest;
  std::string latest_problem;
  try {
    latest = store.latest_pointer();
  } catch (const CheckpointError& e) {
    latest_problem = e.what();
  }
  std::vector<std::string> damaged;
  bool latest_damaged = false;
  for (const auto& c : candidates) {
    try {
      out.manifest = verify_checkpoint_dir(c.dir);
      if (out.manifest.step != c.step)
        throw CheckpointError(c.dir + ": manifest says step " + std::to_string(out.manifest.step));
      out.dir = c.dir;
      for (const auto& d : damaged) out.warnings.push_back("skipped damaged checkpoint: " + d);
      const std::string chosen = fs::path(c.dir).filename().string();
      const std::string pointer = root + "/" + kLatestName;
      if (!latest_problem.empty()) {
        out.warnings.push_back(latest_problem + "; loading the newest valid checkpoint, " + chosen);
      } else if (!latest) {
        out.warnings.push_back(pointer + " is missing; loading the newest valid checkpoint, " + chosen);
      } else if (*latest != c.dir && !latest_damaged) {
        const std::string named = fs::path(*latest).filename().string();
        if (!fs::exists(*latest)) {
          out.warnings.push_back(pointer + " names " + named +
                                 ", which does not exist; loading the newest valid checkpoint, " + chosen);
        } else {
          out.warnings.push_back(pointer + " names " + named + ", but " + chosen +
                                 " is newer and valid (a save was interrupted before it moved latest); loading " +
                                 chosen);
        }
      }
      return out;
    } catch (const CheckpointError& e) {
      damaged.push_back(e.what());
      if (latest && *latest == c.dir) latest_damaged = true;
    }
  }
  std::string message = path + ": no valid checkpoint (refusing to start from step 0): ";
  for (size_t i = 0; i < damaged.size(); ++i) message += (i ? "; " : "") + damaged[i];
  throw CheckpointError(message);
}

}  // namespace keel::checkpoint

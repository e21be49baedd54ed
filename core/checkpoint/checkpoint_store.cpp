// Why: see checkpoint_store.h.
#include "core/checkpoint/checkpoint_store.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/sha256.h"

namespace keel::checkpoint {
namespace fs = std::filesystem;

namespace {

constexpr const char* kLatestName = "latest";
constexpr const char* kTmpSuffix = ".tmp";
constexpr const char* kDeletingSuffix = ".deleting";

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw CheckpointError("cannot remove " + path + ": " + ec.message());
}

}  // namespace

std::string step_dir_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

std::optional<int64_t> parse_step_dir_name(const std::string& name) {
  if (name.size() < 13 || name.size() > 24 || name.compare(0, 5, "step-") != 0) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  return step;
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
                                    const std::vector<std::pair<std::string, int64_t>>& files) {
  const std::string name = step_dir_name(step);
  const std::string tmp = root_ + "/" + name + kTmpSuffix;
  const std::string final_dir = root_ + "/" + name;
  manifest.step = step;
  manifest.files.clear();
  for (const auto& [file, rank] : files) {
    const std::string path = tmp + "/" + file;
    fsync_path(path);
    ManifestFile entry;
    entry.name = file;
    entry.rank = rank;
    entry.bytes = static_cast<int64_t>(fs::file_size(path));
    entry.sha256 = sha256_file(path);
    manifest.files.push_back(std::move(entry));
  }
  // The manifest is the commit record: written (and fsynced) after every file it lists.
  write_file_atomically(tmp + "/" + kManifestName, manifest_to_json(manifest));
  fsync_path(tmp);
  rename_durably(tmp, final_dir);
  verified_.insert(final_dir);
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
  } catch (const CheckpointError&) {
    return false;
  }
  verified_.insert(entry.dir);
  return true;
}

std::vector<CheckpointEntry> CheckpointStore::list_valid() const {
  std::vector<CheckpointEntry> out;
  for (const auto& e : list()) {
    if (is_valid(e)) out.push_back(e);
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
  for (int64_t i = 0; i < count - keep_last; ++i) {
    const CheckpointEntry& e = valid[static_cast<size_t>(i)];
    if (milestone_every > 0 && e.step % milestone_every == 0) continue;
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
    // An explicit checkpoint: load exactly this one or fail.
    out.dir = path;
    out.manifest = verify_checkpoint_dir(path);
    return out;
  }
  const std::string root = path + "/checkpoints";
  CheckpointStore store(root);
  std::vector<CheckpointEntry> candidates = store.list();
  if (candidates.empty()) throw CheckpointError(path + ": no checkpoints in " + root);
  std::reverse(candidates.begin(), candidates.end());  // newest first
  // `latest` first (it is normally the newest anyway), then the others newest first.
  std::optional<std::string> latest;
  try {
    latest = store.latest_pointer();
  } catch (const CheckpointError& e) {
    out.warnings.push_back(e.what());
  }
  if (latest) {
    std::stable_partition(candidates.begin(), candidates.end(), [&](const CheckpointEntry& e) { return e.dir == *latest; });
  }
  std::vector<std::string> damaged;
  for (const auto& c : candidates) {
    try {
      out.manifest = verify_checkpoint_dir(c.dir);
      if (out.manifest.step != c.step) throw CheckpointError(c.dir + ": manifest says step " + std::to_string(out.manifest.step));
      out.dir = c.dir;
      for (const auto& d : damaged) out.warnings.push_back("skipped damaged checkpoint: " + d);
      return out;
    } catch (const CheckpointError& e) {
      damaged.push_back(e.what());
    }
  }
  std::string message = path + ": no valid checkpoint (refusing to start from step 0):";
  for (const auto& d : damaged) message += "\n  " + d;
  throw CheckpointError(message);
}

}  // namespace keel::checkpoint

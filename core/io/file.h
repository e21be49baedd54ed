// Why: a run directory, a checkpoint, an eval report and a report page are only as safe as the order in which
// their bytes reach the disk. This is the one place that writes a file atomically (write PATH.tmp-PID, fsync it,
// rename or link it to PATH, fsync the directory), following the POSIX rules that ext4/xfs honour: a rename is
// atomic, and durable once the parent directory has been fsynced. Readers see the old file or the whole new
// one, never a mix, and no temporary file is left behind on failure. Torch-free; errors are FileError, which a
// caller turns into its own type and prefix ("eval: cannot write PATH: <reason>").
#pragma once

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace keel::io {

// "PATH: REASON" (what()), with the two parts apart: reason() is the OS message or what went wrong.
class FileError : public std::runtime_error {
 public:
  FileError(const std::string& path, const std::string& reason)
      : std::runtime_error(path + ": " + reason), path_(path), reason_(reason) {}
  const std::string& path() const { return path_; }
  const std::string& reason() const { return reason_; }

 private:
  std::string path_;
  std::string reason_;
};

// What write_atomically does when PATH exists. kReplace: rename over it (a config, a manifest, `latest`).
// kKeep: link(), which refuses an existing name, so a file that exists or appears meanwhile is never replaced
// (results written once: `keel eval --out`); where the filesystem has no hard links, rename.
enum class IfExists { kReplace, kKeep };

// Creates PATH through PATH.tmp-PID: write_tmp(tmp) writes the temporary file (any way it likes, e.g. with
// HDF5), then it is fsynced, renamed or linked to PATH and the directory is fsynced. On any failure the
// temporary file is removed and FileError(PATH, reason) is thrown; an exception from write_tmp has its message
// as the reason, with the temporary name replaced by PATH.
void write_atomically(const std::string& path, const std::function<void(const std::string& tmp)>& write_tmp,
                      IfExists if_exists = IfExists::kReplace);
// write_atomically with `contents` as the whole file.
void write_file_atomically(const std::string& path, std::string_view contents, IfExists if_exists = IfExists::kReplace);

// fsync a file or a directory by path; throws FileError naming it.
void fsync_path(const std::string& path);
// Renames `from` to `to` and fsyncs the directory of `to`; throws FileError("cannot rename FROM to TO: ...").
void rename_durably(const std::string& from, const std::string& to);
// Reads a whole (small) file; throws FileError naming it if it cannot be read or is larger than max_bytes.
std::string read_small_file(const std::string& path, size_t max_bytes = 64 << 20);

}  // namespace keel::io

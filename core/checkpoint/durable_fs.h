// Why: a checkpoint is only as safe as the order in which its bytes reach the disk. These helpers make that
// order explicit (write, fsync the file, rename, fsync the directory), following the POSIX rules that ext4/xfs
// honour: a rename is atomic, and durable once the parent directory has been fsynced. Torch-free.
#pragma once

#include <string>

namespace keel::checkpoint {

// fsync a file or a directory by path; throws CheckpointError naming it on failure.
void fsync_path(const std::string& path);
// Writes `contents` to `path` atomically: PATH.tmp-PID, fsync, rename over PATH, fsync the parent directory.
// Readers see the old file or the new one, never a mix.
void write_file_atomically(const std::string& path, const std::string& contents);
// Reads a whole (small) file; throws CheckpointError naming it if it cannot be read.
std::string read_small_file(const std::string& path, size_t max_bytes = 64 << 20);
// Renames `from` to `to` (both in the same directory) and fsyncs that directory.
void rename_durably(const std::string& from, const std::string& to);

}  // namespace keel::checkpoint

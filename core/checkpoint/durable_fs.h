// Why: checkpoint code reports every problem as CheckpointError (the CLI shows it as a user error, and
// resume falls back past a damaged checkpoint by catching it). These are core/io/file.h's durable file
// operations with that error type; the one implementation of the write-fsync-rename order is there. Torch-free.
#pragma once

#include <string>

namespace keel::checkpoint {

// fsync a file or a directory by path; throws CheckpointError naming it on failure.
void fsync_path(const std::string& path);
// Writes `contents` to `path` atomically (io::write_file_atomically: PATH.tmp-PID, fsync, rename over PATH,
// fsync the parent directory). Readers see the old file or the new one, never a mix.
void write_file_atomically(const std::string& path, const std::string& contents);
// Reads a whole (small) file; throws CheckpointError naming it if it cannot be read.
std::string read_small_file(const std::string& path, size_t max_bytes = 64 << 20);
// Renames `from` to `to` (both in the same directory) and fsyncs that directory.
void rename_durably(const std::string& from, const std::string& to);

}  // namespace keel::checkpoint

// Why: see durable_fs.h.
#include "core/checkpoint/durable_fs.h"

#include "core/checkpoint/checkpoint_error.h"
#include "core/io/file.h"

namespace keel::checkpoint {
namespace {

template <typename F>
auto as_checkpoint_error(F&& f) {
  try {
    return f();
  } catch (const io::FileError& e) {
    throw CheckpointError(e.what());
  }
}

}  // namespace

void fsync_path(const std::string& path) {
  as_checkpoint_error([&] { io::fsync_path(path); });
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  as_checkpoint_error([&] { io::write_file_atomically(path, contents); });
}

std::string read_small_file(const std::string& path, size_t max_bytes) {
  return as_checkpoint_error([&] { return io::read_small_file(path, max_bytes); });
}

void rename_durably(const std::string& from, const std::string& to) {
  as_checkpoint_error([&] { io::rename_durably(from, to); });
}

}  // namespace keel::checkpoint
